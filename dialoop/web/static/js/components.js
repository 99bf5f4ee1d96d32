// Building blocks of a chat view, shared by the chat page and the trainer workspace:
// a message tree with the branch on show, and message elements with their actions.
// Text only ever reaches the page through textContent or renderMarkdown (DOM nodes, never HTML).

import { renderMarkdown } from "./markdown.js";

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const ROOT = "root";

/** A conversation's messages as a tree, and which child is on show under each parent. */
export class MessageTree {
  constructor(messages = []) {
    this.byId = new Map();
    this.kids = new Map();
    this.selected = new Map(); // parent key -> child id on show
    for (const m of messages) this.add(m, false);
  }

  static key(parentId) {
    return parentId === null || parentId === undefined ? ROOT : String(parentId);
  }

  /** Add or update a message; `select` puts it on show among its siblings. */
  add(message, select = true) {
    const known = this.byId.has(message.id);
    this.byId.set(message.id, message);
    const key = MessageTree.key(message.parent_id);
    if (!known) {
      if (!this.kids.has(key)) this.kids.set(key, []);
      this.kids.get(key).push(message.id);
      this.kids.get(key).sort((a, b) => a - b);
    }
    if (select) this.selected.set(key, message.id);
  }

  get(id) {
    return this.byId.get(id);
  }

  siblings(message) {
    return this.kids.get(MessageTree.key(message.parent_id)) ?? [];
  }

  children(id) {
    return this.kids.get(MessageTree.key(id)) ?? [];
  }

  select(id) {
    const m = this.byId.get(id);
    if (m) this.selected.set(MessageTree.key(m.parent_id), id);
  }

  /** The branch on show: from the root down, the selected child at each level (default: the newest). */
  path() {
    const path = [];
    let key = ROOT;
    for (;;) {
      const ids = this.kids.get(key);
      if (!ids || ids.length === 0) return path;
      const chosen = this.selected.get(key);
      const id = ids.includes(chosen) ? chosen : ids[ids.length - 1];
      path.push(this.byId.get(id));
      key = String(id);
    }
  }

  /** The path from the root down to message `id`. */
  pathTo(id) {
    const path = [];
    for (let m = this.byId.get(id); m; m = this.byId.get(m.parent_id)) path.unshift(m);
    return path;
  }
}

/** `< i/n >` buttons to move between a message and its siblings. */
export function siblingSwitcher(tree, message, onSwitch) {
  const ids = tree.siblings(message);
  if (ids.length < 2) return null;
  const i = ids.indexOf(message.id);
  const go = (j) => () => onSwitch(ids[j]);
  return el(
    "span",
    { class: "switcher", role: "group", "aria-label": "Versions" },
    el("button", { type: "button", class: "prev", "aria-label": "Previous version", disabled: i === 0, onclick: go(i - 1), text: "<" }),
    el("span", { class: "position", text: `${i + 1}/${ids.length}` }),
    el("button", { type: "button", class: "next", "aria-label": "Next version", disabled: i === ids.length - 1, onclick: go(i + 1), text: ">" }),
  );
}

/** The body of a message: markdown for the assistant, the text as typed for everyone else. */
export function messageBody(message) {
  const body = el("div", { class: "content" });
  if (message.role === "assistant") body.append(renderMarkdown(message.content));
  else {
    body.classList.add("plain");
    body.textContent = message.content;
  }
  return body;
}

/**
 * A message element. `actions` may hold onEdit(message, newText), onRegenerate(message),
 * onReply(userMessage), onThumbs(message, value), onSwitch(id); missing ones are not offered.
 */
export function messageElement(tree, message, actions = {}) {
  const node = el("article", {
    class: `message ${message.role}${message.stopped ? " stopped" : ""}`,
    dataset: { id: message.id, role: message.role },
  });
  const who = message.role === "assistant" ? message.model || "assistant" : message.role;
  node.append(el("div", { class: "meta" }, el("span", { class: "author", text: who })));
  node.append(messageBody(message));
  if (message.stopped) node.append(el("p", { class: "note muted", text: "Stopped before the end." }));
  else if (message.role === "assistant" && message.finished === false) {
    node.append(el("p", { class: "note muted", text: "Cut off at the token limit." }));
  }

  const bar = el("div", { class: "actions" });
  const switcher = actions.onSwitch ? siblingSwitcher(tree, message, actions.onSwitch) : null;
  if (switcher) bar.append(switcher);
  if (message.role === "user" && actions.onEdit) {
    bar.append(el("button", { type: "button", class: "edit", text: "Edit", onclick: () => startEdit(node, message, actions.onEdit) }));
  }
  if (message.role === "user" && actions.onReply && tree.children(message.id).length === 0) {
    // a reply that failed or was stopped before its first word left this message unanswered
    bar.append(el("button", { type: "button", class: "reply", text: "Get a reply", onclick: () => actions.onReply(message) }));
  }
  if (message.role === "assistant") {
    bar.append(
      el("button", {
        type: "button",
        class: "copy",
        text: "Copy",
        onclick: () => navigator.clipboard?.writeText(message.content).catch(() => {}),
      }),
    );
    if (actions.onRegenerate) {
      bar.append(el("button", { type: "button", class: "regenerate", text: "Regenerate", onclick: () => actions.onRegenerate(message) }));
    }
    if (actions.onThumbs) {
      const thumb = (value, label, word) =>
        el("button", {
          type: "button",
          class: `thumb ${value > 0 ? "up" : "down"}`,
          "aria-label": label,
          title: label,
          "aria-pressed": String(message.thumbs === value),
          text: word,
          onclick: () => actions.onThumbs(message, message.thumbs === value ? 0 : value),
        });
      // words, not emoji: a thumbs glyph is missing from many system fonts
      bar.append(thumb(1, "Good reply", "Good"), thumb(-1, "Bad reply", "Bad"));
    }
  }
  node.append(bar);
  return node;
}

function startEdit(node, message, onEdit) {
  const box = el("textarea", { class: "edit-box", rows: "3", "aria-label": "Edit message" });
  box.value = message.content;
  const form = el(
    "form",
    { class: "edit-form" },
    box,
    el("div", { class: "row" },
      el("button", { type: "submit", class: "primary", text: "Save and send" }),
      el("button", { type: "button", class: "cancel", text: "Cancel", onclick: () => form.replaceWith(body) }),
    ),
  );
  const body = node.querySelector(".content");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (box.value.trim()) onEdit(message, box.value);
  });
  body.replaceWith(form);
  box.focus();
}

/** An assistant message being streamed: call update(text) as deltas arrive (rendered once per frame). */
export function streamingElement(model) {
  const body = el("div", { class: "content" });
  const node = el(
    "article",
    { class: "message assistant streaming", dataset: { role: "assistant" } },
    el("div", { class: "meta" }, el("span", { class: "author", text: model || "assistant" })),
    body,
    el("div", { class: "typing muted", text: "writing…" }),
  );
  let text = "";
  let scheduled = false;
  const paint = () => {
    scheduled = false;
    body.replaceChildren(renderMarkdown(text));
  };
  return {
    node,
    update(next) {
      text = next;
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(paint);
      }
    },
  };
}
