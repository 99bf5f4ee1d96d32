// The chat page: conversation list, the branch on show, streaming replies with a server-side stop,
// regenerate / edit (new branches), thumbs and "which reply is better?" feedback.

import { getJson, sendJson, streamEvents } from "./api.js";
import { MessageTree, el, messageElement, streamingElement } from "./components.js";

const $ = (id) => document.getElementById(id);

class ChatPage {
  constructor(root) {
    this.api = root.dataset.api;
    this.conversationId = root.dataset.conversationId ? Number(root.dataset.conversationId) : null;
    this.conversation = null;
    this.tree = new MessageTree();
    this.generationId = null;
    this.streaming = false;
    this.pendingChoice = null; // {newId, oldId}: ask which reply is better
    this.served = null;
    this.messages = $("messages");
    this.bind();
    this.restoreSettings();
  }

  bind() {
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    });
    $("stop").addEventListener("click", () => this.stop());
    $("settings-toggle").addEventListener("click", () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("settings-toggle").setAttribute("aria-expanded", String(!panel.hidden));
    });
    $("save-system").addEventListener("click", () => this.saveSystemPrompt());
    $("rename").addEventListener("click", () => this.startRename());
    $("rename-cancel").addEventListener("click", () => this.endRename());
    $("rename-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.rename($("rename-input").value);
    });
    $("delete").addEventListener("click", () => this.remove());
    for (const id of ["temperature", "max-tokens"]) {
      $(id).addEventListener("change", () => localStorage.setItem(`dialoop.${id}`, $(id).value));
    }
  }

  restoreSettings() {
    for (const id of ["temperature", "max-tokens"]) {
      const saved = localStorage.getItem(`dialoop.${id}`);
      if (saved !== null) $(id).value = saved;
    }
  }

  options() {
    const opts = { temperature: Number($("temperature").value || 0.7) };
    const maxTokens = $("max-tokens").value;
    if (maxTokens) opts.max_tokens = Number(maxTokens);
    const model = $("model-picker").value;
    if (model) opts.model = model;
    return opts;
  }

  showError(message) {
    const box = $("chat-error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  async start() {
    await Promise.all([this.loadModels(), this.loadList()]);
    if (this.conversationId !== null) await this.load();
    else this.render();
    $("prompt").focus();
  }

  async loadModels() {
    const data = await getJson(`${this.api}/models`);
    this.served = data.served;
    const picker = $("model-picker");
    picker.replaceChildren(
      ...data.models.map((m) => el("option", { value: m.name, text: m.name === data.served ? `${m.name} (served)` : m.name })),
    );
    picker.value = data.served;
  }

  async loadList() {
    const list = await getJson(`${this.api}/conversations`);
    $("conversation-list").replaceChildren(
      ...list.map((c) =>
        el(
          "li",
          { class: c.id === this.conversationId ? "active" : "" },
          el("a", { href: `/chat/${c.id}`, text: c.title || "Untitled chat", "aria-current": c.id === this.conversationId ? "page" : null }),
        ),
      ),
    );
  }

  async load() {
    const data = await getJson(`${this.api}/conversations/${this.conversationId}`);
    this.conversation = data.conversation;
    this.tree = new MessageTree(data.messages);
    $("system-prompt").value = this.conversation.system_prompt;
    // continue with the model that wrote the last reply on show, when it is still offered
    const last = this.tree.path().filter((m) => m.role === "assistant").pop();
    if (last?.model && [...$("model-picker").options].some((o) => o.value === last.model)) $("model-picker").value = last.model;
    this.render();
  }

  url(suffix = "") {
    return `${this.api}/conversations/${this.conversationId}${suffix}`;
  }

  render() {
    $("chat-title").textContent = this.conversation?.title || "New chat";
    document.title = `${this.conversation?.title || "New chat"} · Dialoop`;
    $("rename").disabled = $("delete").disabled = this.conversationId === null;
    const path = this.tree.path();
    const actions = this.streaming
      ? {}
      : {
          onSwitch: (id) => {
            this.tree.select(id);
            this.pendingChoice = null;
            this.render();
          },
          onEdit: (m, text) => this.edit(m, text),
          onRegenerate: (m) => this.regenerate(m),
          onReply: (m) => this.reply(m),
          onThumbs: (m, value) => this.thumbs(m, value),
        };
    const nodes = path.map((m) => messageElement(this.tree, m, actions));
    if (this.pendingChoice && !this.streaming) {
      const at = path.findIndex((m) => m.id === this.pendingChoice.newId);
      if (at >= 0) nodes.splice(at + 1, 0, this.choiceElement());
    }
    if (nodes.length === 0) nodes.push(el("p", { class: "empty muted", id: "empty-hint", text: "Ask anything. Replies stream in; you can stop, regenerate, edit and rate them." }));
    this.messages.replaceChildren(...nodes);
  }

  scrollDown() {
    this.messages.scrollTop = this.messages.scrollHeight;
  }

  setStreaming(on) {
    this.streaming = on;
    $("send").hidden = on;
    $("stop").hidden = !on;
    $("prompt").disabled = false;
  }

  async ensureConversation() {
    if (this.conversationId !== null) return;
    this.conversation = await sendJson("POST", `${this.api}/conversations`, { system_prompt: $("system-prompt").value });
    this.conversationId = this.conversation.id;
    history.pushState({}, "", `/chat/${this.conversationId}`);
    document.getElementById("chat-app").dataset.conversationId = String(this.conversationId);
  }

  async send() {
    const text = $("prompt").value;
    if (this.streaming || !text.trim()) return;
    this.showError("");
    try {
      await this.ensureConversation();
      const path = this.tree.path();
      const parent = path.length ? path[path.length - 1] : null;
      if (parent && parent.role !== "assistant") {
        this.showError("The last message has no reply yet: use “Get a reply” or edit it first.");
        return;
      }
      $("prompt").value = "";
      await this.stream(this.url("/messages"), { parent_id: parent ? parent.id : null, content: text, ...this.options() });
    } catch (err) {
      this.showError(err.message);
      if (!$("prompt").value) $("prompt").value = text;
    }
  }

  async edit(message, text) {
    if (this.streaming) return;
    this.showError("");
    this.pendingChoice = null;
    try {
      await this.stream(this.url("/messages"), { parent_id: message.parent_id, content: text, ...this.options() });
    } catch (err) {
      this.showError(err.message);
      this.render();
    }
  }

  async regenerate(message) {
    if (this.streaming) return;
    this.showError("");
    this.pendingChoice = null;
    try {
      const reply = await this.stream(this.url(`/messages/${message.parent_id}/replies`), this.options(), message.parent_id);
      if (reply) this.pendingChoice = { newId: reply.id, oldId: message.id };
      this.render();
    } catch (err) {
      this.showError(err.message);
      this.render();
    }
  }

  async reply(question) {
    if (this.streaming) return;
    this.showError("");
    try {
      await this.stream(this.url(`/messages/${question.id}/replies`), this.options(), question.id);
    } catch (err) {
      this.showError(err.message);
      this.render();
    }
  }

  /** Stream a reply; the streaming message is shown under `parentId` (or under the new user message). */
  async stream(url, body, parentId = undefined) {
    this.setStreaming(true);
    let live = null;
    let text = "";
    let reply = null;
    const showPending = (model) => {
      const cut = parentId === undefined ? null : parentId;
      if (cut !== null) this.tree.select(cut);
      this.render();
      if (cut !== null) {
        // drop the old reply (and what followed it) from view while the new one streams
        const keep = new Set(this.tree.pathTo(cut).map((m) => m.id));
        for (const node of [...this.messages.querySelectorAll(".message")]) {
          if (!keep.has(Number(node.dataset.id))) node.remove();
        }
      }
      this.messages.querySelector("#empty-hint")?.remove();
      live = streamingElement(model);
      this.messages.append(live.node);
      this.scrollDown();
    };
    try {
      await streamEvents(url, body, (event) => {
        if (event.type === "user") {
          this.tree.add(event.message);
          parentId = event.message.id;
          if (!this.conversation.title) {
            // the server names a new chat after its first message: show it in the list at once
            this.conversation.title = event.message.content.trim().split("\n")[0].slice(0, 80);
            this.loadList().catch(() => {});
          }
        } else if (event.type === "start") {
          this.generationId = event.generation_id;
          showPending(event.model);
        } else if (event.type === "delta") {
          text += event.text;
          live?.update(text);
          this.scrollDown();
        } else if (event.type === "done") {
          reply = event.message;
          if (reply) this.tree.add(reply);
        } else if (event.type === "error") {
          this.showError(`The reply failed: ${event.message}`);
        }
      });
    } finally {
      this.generationId = null;
      this.setStreaming(false);
      this.render();
      this.scrollDown();
      this.loadList().catch(() => {});
    }
    return reply;
  }

  async stop() {
    if (!this.generationId) return;
    $("stop").disabled = true;
    try {
      await sendJson("POST", this.url(`/generations/${this.generationId}/stop`));
    } catch (err) {
      this.showError(err.message);
    } finally {
      $("stop").disabled = false;
    }
  }

  async thumbs(message, value) {
    try {
      await sendJson("PUT", this.url(`/messages/${message.id}/feedback`), { value });
      message.thumbs = value;
      this.render();
    } catch (err) {
      this.showError(err.message);
    }
  }

  choiceElement() {
    const { newId, oldId } = this.pendingChoice;
    const ids = this.tree.siblings(this.tree.get(newId));
    const label = (id) => `${ids.indexOf(id) + 1}/${ids.length}`;
    const choose = (better, worse) => async () => {
      try {
        await sendJson("POST", this.url(`/messages/${better}/preference`), { other_id: worse });
        this.pendingChoice = null;
        box.replaceChildren(el("span", { class: "muted", text: "Thanks: your choice helps train the next model." }));
      } catch (err) {
        this.showError(err.message);
      }
    };
    const box = el(
      "div",
      { class: "choice", role: "group", "aria-label": "Which reply is better?" },
      el("span", { text: "Which reply is better?" }),
      el("button", { type: "button", class: "choose-new", text: `This one (${label(newId)})`, onclick: choose(newId, oldId) }),
      el("button", { type: "button", class: "choose-old", text: `The previous one (${label(oldId)})`, onclick: choose(oldId, newId) }),
      el("button", {
        type: "button",
        class: "choose-skip link-button",
        text: "Skip",
        onclick: () => {
          this.pendingChoice = null;
          box.remove();
        },
      }),
    );
    return box;
  }

  async saveSystemPrompt() {
    this.showError("");
    try {
      if (this.conversationId === null) {
        await this.ensureConversation();
      } else {
        this.conversation = await sendJson("PATCH", this.url(), { system_prompt: $("system-prompt").value });
      }
      $("system-saved").hidden = false;
      setTimeout(() => ($("system-saved").hidden = true), 1500);
      this.render();
      await this.loadList();
    } catch (err) {
      this.showError(err.message);
    }
  }

  startRename() {
    $("rename-input").value = this.conversation?.title ?? "";
    $("rename-form").hidden = false;
    $("chat-title").hidden = true;
    $("rename-input").focus();
  }

  endRename() {
    $("rename-form").hidden = true;
    $("chat-title").hidden = false;
  }

  async rename(title) {
    try {
      this.conversation = await sendJson("PATCH", this.url(), { title });
      this.endRename();
      this.render();
      await this.loadList();
    } catch (err) {
      this.showError(err.message);
    }
  }

  async remove() {
    if (this.conversationId === null) return;
    if (!window.confirm(`Delete "${this.conversation?.title || "this chat"}"? This cannot be undone.`)) return;
    try {
      await sendJson("DELETE", this.url());
      window.location.assign("/chat");
    } catch (err) {
      this.showError(err.message);
    }
  }
}

const root = document.getElementById("chat-app");
if (root) {
  const page = new ChatPage(root);
  window.dialoopChat = page; // for the browser tests and the console
  page.start().catch((err) => page.showError(err.message));
}
