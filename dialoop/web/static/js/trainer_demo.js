// The demonstration editor: the trainer writes both sides of a conversation. Every turn is saved as
// they type (a moment after each change) and kept in this browser until the server has it, so no text
// is lost to a closed tab or a failed request. "Suggest" streams model-written replies to insert and edit.

import { getJson, request, sendJson, streamEvents } from "./api.js";
import { el } from "./components.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const SAVE_DELAY_MS = 700;

/** One textarea of the editor: a stored turn (`id`), or the next turn, stored once it has text. */
class TurnBox {
  constructor(editor, turn) {
    this.editor = editor;
    this.id = turn.id ?? null;
    this.role = turn.role;
    this.saved = turn.content ?? "";
    this.fromSuggestion = Boolean(turn.from_suggestion);
    this.timer = null;
    this.saving = null; // the save in flight
    this.again = false; // the text changed while saving: save once more
    this.build();
  }

  build() {
    this.textarea = el("textarea", {
      rows: "4",
      class: "turn-text",
      "aria-label": this.id === null ? `Next turn (${this.role})` : `${this.role} turn`,
      placeholder: this.role === "user" ? "What the user says…" : "The reply you wish the assistant gave…",
      readonly: !this.editor.editable,
    });
    this.textarea.value = this.saved;
    this.state = el("span", { class: "save-state" });
    this.origin = el("span", { class: "origin muted" });
    this.bar = el(
      "div",
      { class: "turn-bar" },
      el("span", { class: "role-name", text: this.id === null ? `Next: ${this.role}` : this.role }),
      this.origin,
      this.state,
    );
    this.node = el("article", { class: `turn ${this.role}${this.id === null ? " next" : ""}`, dataset: { role: this.role } }, this.bar, this.textarea);
    this.textarea.addEventListener("input", () => {
      this.fit();
      this.changed();
    });
    this.textarea.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        this.editor.advance(this);
      }
    });
    this.mark();
  }

  /** Grow the textarea with its text (CSSOM, which the page's Content-Security-Policy allows). */
  fit() {
    this.textarea.style.height = "auto";
    this.textarea.style.height = `${Math.max(this.textarea.scrollHeight + 2, 72)}px`;
  }

  get key() {
    return `dialoop.demo.${this.editor.id}.${this.id ?? "next"}`;
  }

  get dirty() {
    return this.textarea.value !== this.saved || this.saving !== null;
  }

  mark(text) {
    if (this.id !== null) this.node.dataset.id = this.id;
    this.node.classList.toggle("next", this.id === null);
    this.bar.querySelector(".role-name").textContent = this.id === null ? `Next: ${this.role}` : this.role;
    this.textarea.setAttribute("aria-label", this.id === null ? `Next turn (${this.role})` : `${this.role} turn`);
    this.origin.textContent = this.fromSuggestion ? "from a model suggestion" : "";
    if (text !== undefined) this.state.textContent = text;
  }

  changed() {
    localStorage.setItem(this.key, this.textarea.value);
    this.mark("unsaved");
    this.editor.showSaveState();
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.save(), SAVE_DELAY_MS);
  }

  /** Save now (waits for a save in flight first); resolves when the server has the current text. */
  async save() {
    clearTimeout(this.timer);
    if (this.saving) {
      this.again = true;
      return this.saving;
    }
    const text = this.textarea.value;
    if (text === this.saved || (this.id === null && !text.trim())) {
      if (text === this.saved) localStorage.removeItem(this.key);
      return;
    }
    this.mark("saving…");
    this.saving = (async () => {
      try {
        if (this.id === null) {
          const created = await sendJson("POST", `${this.editor.url}/turns`, { role: this.role, content: text });
          localStorage.removeItem(this.key);
          this.id = created.turn.id;
          this.saved = text;
          this.editor.created(this, created.demonstration);
        } else {
          const saved = await sendJson("PUT", `${this.editor.url}/turns/${this.id}`, { content: text });
          this.editor.setStatus(saved.status);
        }
        this.saved = text;
        if (this.textarea.value === text) localStorage.removeItem(this.key);
        else localStorage.setItem(this.key, this.textarea.value);
        this.mark(this.textarea.value === text ? "saved" : "unsaved");
        this.editor.showError("");
        this.editor.updateSuggestPanel();
      } catch (error) {
        this.mark("not saved");
        this.editor.showError(`Not saved (kept in this browser): ${error.message}`);
        throw error;
      } finally {
        this.saving = null;
        this.editor.showSaveState();
      }
    })();
    try {
      await this.saving;
    } finally {
      if (this.again) {
        this.again = false;
        await this.save();
      }
    }
  }
}

class DemonstrationEditor {
  constructor(root) {
    this.id = Number(root.dataset.demonstrationId);
    this.api = root.dataset.api;
    this.url = `${this.api}/demonstrations/${this.id}`;
    this.boxes = [];
    this.editable = true;
    this.suggestions = null; // {generationId, cards: [{node, text, body, button}]}
    this.controller = null;
    this.bind();
  }

  bind() {
    $("submit-demo").addEventListener("click", () => this.submit());
    $("delete-demo").addEventListener("click", () => this.remove());
    $("suggest").addEventListener("click", () => this.suggest());
    $("suggest-stop").addEventListener("click", () => this.stopSuggestions());
    for (const id of ["suggest-n", "suggest-temperature", "suggest-max-tokens"]) {
      const saved = localStorage.getItem(`dialoop.${id}`);
      if (saved !== null) $(id).value = saved;
      $(id).addEventListener("change", () => localStorage.setItem(`dialoop.${id}`, $(id).value));
    }
    window.addEventListener("beforeunload", (event) => {
      // the text is in this browser anyway; the prompt only says the server does not have it yet
      if (this.boxes.some((b) => b.dirty && (b.id !== null || b.textarea.value.trim()))) event.preventDefault();
    });
  }

  showError(message) {
    $("demo-error").textContent = message || "";
    $("demo-error").hidden = !message;
  }

  notice(message) {
    $("demo-notice").textContent = message || "";
    $("demo-notice").hidden = !message;
  }

  showSaveState() {
    const pending = this.boxes.some((b) => b.dirty && (b.id !== null || b.textarea.value.trim()));
    $("save-state").textContent = pending ? "Saving…" : "All changes saved";
  }

  setStatus(status) {
    this.status = status;
    this.editable = ["draft", "submitted", "rejected"].includes(status);
    $("demo-status").textContent = status;
    $("demo-status").className = `status status-${status}`;
    $("submit-demo").disabled = !this.editable || status === "submitted";
    $("delete-demo").disabled = !this.editable;
  }

  async load() {
    const data = await getJson(this.url);
    this.setStatus(data.status);
    $("demo-title").textContent = data.title || "New demonstration";
    this.render(data.turns);
  }

  /** Rebuild every box from the server's turns, then put back text only this browser has. */
  render(turns) {
    this.boxes = turns.map((t) => new TurnBox(this, t));
    if (this.editable) this.boxes.push(this.nextBox());
    $("turns").replaceChildren(...this.boxes.map((b) => b.node));
    for (const box of this.boxes) box.fit();
    let restored = 0;
    for (const box of this.boxes) {
      const local = localStorage.getItem(box.key);
      if (local !== null && local !== box.saved && this.editable) {
        box.textarea.value = local;
        box.changed();
        restored += 1;
      } else if (local !== null) localStorage.removeItem(box.key);
    }
    if (restored) this.notice("Restored text you typed here that had not reached the server yet; it is being saved now.");
    this.updateRemove();
    this.updateSuggestPanel();
    this.showSaveState();
  }

  nextBox() {
    const last = this.boxes.filter((b) => b.id !== null).pop();
    return new TurnBox(this, { id: null, role: !last || last.role === "assistant" ? "user" : "assistant", content: "" });
  }

  /** A next box was stored: it becomes a turn, and a new next box follows it (focus stays put). */
  created(box, demonstration) {
    box.fromSuggestion = false;
    box.mark();
    if (demonstration) $("demo-title").textContent = demonstration.title || "New demonstration";
    const next = this.nextBox();
    this.boxes.push(next);
    $("turns").append(next.node);
    const local = localStorage.getItem(next.key);
    if (local) {
      next.textarea.value = local;
      next.changed();
    }
    this.updateRemove();
    this.updateSuggestPanel();
  }

  advance(box) {
    box.save().catch(() => {});
    const i = this.boxes.indexOf(box);
    const target = this.boxes[i + 1] ?? this.boxes[this.boxes.length - 1];
    // the next box appears once this one is stored
    if (target === box && box.id === null) {
      box.save().then(() => this.boxes[this.boxes.length - 1].textarea.focus()).catch(() => {});
    } else target.textarea.focus();
  }

  stored() {
    return this.boxes.filter((b) => b.id !== null);
  }

  updateRemove() {
    for (const b of this.boxes) b.node.querySelector(".remove")?.remove();
    const last = this.stored().pop();
    if (!last || !this.editable) return;
    last.bar.append(el("button", { type: "button", class: "remove", text: "Remove turn", onclick: () => this.removeLast(last) }));
  }

  updateSuggestPanel() {
    // suggestions answer the last user turn: offered once there is one, for the reply that follows it
    const stored = this.stored();
    const question = stored.filter((b) => b.role === "user").pop();
    $("suggest-panel").hidden = !this.editable || !question;
    if (!question) return;
    const replaces = stored[stored.length - 1].role === "assistant";
    const start = question.saved.trim().split("\n")[0];
    $("suggest-for").textContent =
      `Replies to “${start.length > 80 ? `${start.slice(0, 80)}…` : start}”` +
      (replaces ? "; inserting one replaces the assistant's reply below it." : "; insert one, then edit it.");
  }

  async flush() {
    await Promise.all(this.boxes.map((b) => b.save()));
  }

  async removeLast(box) {
    if (box.textarea.value.trim() && !window.confirm(`Remove the last turn (${box.role})?`)) return;
    try {
      await this.flush();
      await request("DELETE", `${this.url}/turns/${box.id}`);
      for (const b of this.boxes) localStorage.removeItem(b.key);
      await this.load();
    } catch (error) {
      this.showError(error.message);
    }
  }

  async submit() {
    this.showError("");
    try {
      await this.flush();
      const data = await sendJson("POST", `${this.url}/submit`);
      this.setStatus(data.status);
      this.notice("Submitted for review. You can still edit it until an admin accepts it.");
    } catch (error) {
      this.showError(error.message);
    }
  }

  async remove() {
    if (!window.confirm("Delete this demonstration?")) return;
    try {
      await request("DELETE", this.url);
      for (const b of this.boxes) localStorage.removeItem(b.key);
      window.location.assign("/trainer/demonstrations");
    } catch (error) {
      this.showError(error.message);
    }
  }

  // suggestions

  suggestionCard(index) {
    const body = el("div", { class: "content" });
    const state = el("span", { class: "state", text: "writing…" });
    const button = el("button", { type: "button", class: "insert", text: "Insert", disabled: true });
    const node = el(
      "article",
      { class: "suggestion", dataset: { index } },
      el("div", { class: "bar" }, el("strong", { text: `Suggestion ${index + 1}` }), state, button),
      body,
    );
    const card = { node, body, state, button, text: "", scheduled: false };
    button.addEventListener("click", () => this.insert(index));
    return card;
  }

  paint(card) {
    if (card.scheduled) return;
    card.scheduled = true;
    requestAnimationFrame(() => {
      card.scheduled = false;
      card.body.replaceChildren(renderMarkdown(card.text));
    });
  }

  async suggest() {
    this.showError("");
    try {
      await this.flush();
    } catch {
      return;
    }
    const body = {
      n: Number($("suggest-n").value || 3),
      temperature: Number($("suggest-temperature").value || 0.8),
    };
    if ($("suggest-max-tokens").value) body.max_tokens = Number($("suggest-max-tokens").value);
    const set = { generationId: null, cards: [], done: false };
    this.suggestions = set;
    $("suggestions").replaceChildren();
    $("suggest").disabled = true;
    $("suggest-stop").hidden = false;
    this.controller = new AbortController();
    try {
      await streamEvents(
        `${this.url}/suggestions`,
        body,
        (event) => {
          if (event.type === "start") {
            set.generationId = event.generation_id;
            set.cards = Array.from({ length: event.n }, (_, i) => this.suggestionCard(i));
            $("suggestions").replaceChildren(...set.cards.map((c) => c.node));
          } else if (event.type === "delta") {
            const card = set.cards[event.index];
            card.text += event.text;
            this.paint(card);
          } else if (event.type === "end") {
            const reason = { stop: "finished", length: "cut off at the token limit", cancelled: "stopped" }[event.finish_reason];
            set.cards[event.index].state.textContent = reason ?? event.finish_reason;
          } else if (event.type === "done") {
            set.done = true;
            for (const s of event.suggestions) {
              const card = set.cards[s.index];
              card.text = s.text;
              card.body.replaceChildren(renderMarkdown(s.text));
              card.button.disabled = false;
              card.node.classList.add("ready");
            }
          } else if (event.type === "error") {
            this.showError(event.message);
          }
        },
        { signal: this.controller.signal },
      );
    } catch (error) {
      if (error.name !== "AbortError") this.showError(error.message);
    } finally {
      $("suggest").disabled = false;
      $("suggest-stop").hidden = true;
      this.controller = null;
    }
  }

  async stopSuggestions() {
    const id = this.suggestions?.generationId;
    if (id) await request("POST", `${this.api}/suggestions/${id}/stop`).catch(() => {});
  }

  /** Insert suggestion `index` as the assistant's reply (replacing the reply written so far, if any). */
  async insert(index) {
    const set = this.suggestions;
    this.showError("");
    try {
      await this.flush();
      const last = this.stored().pop();
      const replace = last?.role === "assistant";
      if (replace && last.textarea.value.trim() && !window.confirm("Replace the assistant's reply with this suggestion?")) return;
      const created = await sendJson("POST", `${this.url}/turns`, {
        role: "assistant",
        content: set.cards[index].text,
        suggestion: { generation_id: set.generationId, index },
        replace_last: replace,
      });
      for (const b of this.boxes) localStorage.removeItem(b.key);
      await this.load();
      for (const card of set.cards) card.node.classList.toggle("inserted", card === set.cards[index]);
      const box = this.boxes.find((b) => b.id === created.turn.id);
      if (box) {
        box.mark("inserted: edit it as you like");
        box.textarea.focus();
        box.textarea.setSelectionRange(box.textarea.value.length, box.textarea.value.length);
      }
    } catch (error) {
      this.showError(error.message);
    }
  }
}

const root = document.getElementById("demo-app");
if (root) {
  const editor = new DemonstrationEditor(root);
  editor.load().then(
    () => editor.boxes[editor.boxes.length - 1]?.textarea.focus(),
    (error) => editor.showError(error.message),
  );
}
