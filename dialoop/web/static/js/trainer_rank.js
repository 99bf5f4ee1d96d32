// Ranking a comparison task: order the K replies best first by dragging them or by keyboard alone,
// tie neighbours, say "all bad", flag replies, or skip with a reason. A submitted answer can be changed.

import { getJson, sendJson } from "./api.js";
import { el, messageBody } from "./components.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const FLAG_LABELS = { harmful: "Harmful", untrue: "Untrue", private_data: "Private data" };
const FLAG_KEYS = { h: "harmful", u: "untrue", p: "private_data" };

class RankPage {
  constructor(root) {
    this.api = root.dataset.api;
    this.revisit = root.dataset.taskId ? Number(root.dataset.taskId) : null;
    this.flagKinds = $("candidates").dataset.flags.split(",").filter(Boolean);
    this.task = null;
    this.order = []; // candidate indices, best first
    this.tiedAbove = new Map(); // candidate -> the candidate above it that it is tied with
    this.flags = new Map(); // candidate -> Set of flag kinds
    this.dragged = null;
    this.bind();
  }

  bind() {
    $("submit-ranking").addEventListener("click", () => this.submit());
    $("skip-button").addEventListener("click", () => this.skip());
    $("skip-choice").addEventListener("change", () => {
      if ($("skip-choice").value === "other") $("skip-reason").focus();
    });
    const list = $("candidates");
    list.addEventListener("keydown", (e) => this.onKey(e));
    list.addEventListener("dragstart", (e) => {
      const item = e.target.closest?.(".candidate");
      if (!item) return;
      this.dragged = Number(item.dataset.index);
      item.classList.add("dragging");
      e.dataTransfer.effectAllowed = "move";
      e.dataTransfer.setData("text/plain", String(this.dragged));
    });
    list.addEventListener("dragover", (e) => {
      const item = e.target.closest?.(".candidate");
      if (this.dragged === null || !item) return;
      e.preventDefault();
      for (const node of list.children) node.classList.remove("drop-before", "drop-after");
      item.classList.add(this.dropAfter(e, item) ? "drop-after" : "drop-before");
    });
    list.addEventListener("dragleave", (e) => e.target.closest?.(".candidate")?.classList.remove("drop-before", "drop-after"));
    list.addEventListener("drop", (e) => {
      const item = e.target.closest?.(".candidate");
      if (this.dragged === null || !item) return;
      e.preventDefault();
      const target = Number(item.dataset.index);
      const dragged = this.dragged;
      if (target !== dragged) {
        const rest = this.order.filter((c) => c !== dragged);
        const at = rest.indexOf(target) + (this.dropAfter(e, item) ? 1 : 0);
        rest.splice(at, 0, dragged);
        this.setOrder(rest, dragged);
      }
    });
    list.addEventListener("dragend", () => {
      this.dragged = null;
      for (const node of list.children) node.classList.remove("dragging", "drop-before", "drop-after");
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && this.task && !$("task").hidden) {
        e.preventDefault();
        this.submit();
      }
    });
  }

  dropAfter(event, item) {
    const box = item.getBoundingClientRect();
    return event.clientY > box.top + box.height / 2;
  }

  status(message) {
    $("rank-status").textContent = message || "";
    $("rank-status").hidden = !message;
  }

  showError(message) {
    $("rank-error").textContent = message || "";
    $("rank-error").hidden = !message;
  }

  async start() {
    try {
      if (this.revisit !== null) this.show(await getJson(`${this.api}/tasks/${this.revisit}`));
      else await this.next();
    } catch (error) {
      this.status("");
      this.showError(error.message);
      $("task").hidden = false;
    }
  }

  async next() {
    $("task").hidden = true;
    $("rank-empty").hidden = true;
    const data = await sendJson("POST", `${this.api}/tasks/next`);
    if (!data.task) {
      this.task = null;
      $("rank-empty").textContent = data.message;
      $("rank-empty").hidden = false;
      $("task-info").textContent = "";
      return;
    }
    this.show(data.task);
  }

  show(task) {
    this.task = task;
    const answer = task.answer;
    const shown = task.candidates.map((c) => c.index);
    this.order = answer?.order?.length === shown.length ? answer.order.slice() : shown;
    this.tiedAbove = new Map((answer?.ties ?? []).map(([a, b]) => [b, a]));
    this.flags = new Map(Object.entries(answer?.flags ?? {}).map(([i, kinds]) => [Number(i), new Set(kinds)]));
    $("all-bad").checked = Boolean(answer?.all_bad);
    $("skip-reason").value = answer?.skip_reason ?? "";
    $("skip-choice").value = "";
    $("skip").open = false;
    $("next-task").hidden = this.revisit === null;
    const mine = answer ? (answer.skip_reason !== null ? " · you skipped it: change your answer below" : " · your answer: change it below") : "";
    $("task-info").textContent = `Task #${task.id} · ${task.k} replies · ${task.rankings}/${task.overlap} rankings${mine}`;
    $("rank-title").textContent = this.revisit !== null ? `Change your answer to task #${task.id}` : "Rank replies";
    $("context").replaceChildren(
      ...task.context.map((m) =>
        el("article", { class: `message ${m.role}` }, el("div", { class: "meta" }, el("span", { class: "author", text: m.role })), messageBody(m)),
      ),
    );
    this.showError("");
    $("task").hidden = false;
    this.renderList(this.order[0]);
  }

  candidate(index) {
    return this.task.candidates.find((c) => c.index === index);
  }

  /** Place numbers: tied replies share one. */
  places() {
    const places = new Map();
    let place = 0;
    this.order.forEach((c, i) => {
      if (i === 0 || this.tiedAbove.get(c) !== this.order[i - 1]) place = i + 1;
      places.set(c, place);
    });
    return places;
  }

  renderList(focus) {
    const places = this.places();
    const items = this.order.map((index, i) => {
      const c = this.candidate(index);
      const tied = i > 0 && this.tiedAbove.get(index) === this.order[i - 1];
      const flags = this.flags.get(index) ?? new Set();
      const tools = el(
        "div",
        { class: "tools" },
        el("button", { type: "button", class: "up", text: "↑", "aria-label": "Move up", tabindex: "-1", disabled: i === 0, onclick: () => this.move(index, -1) }),
        el("button", { type: "button", class: "down", text: "↓", "aria-label": "Move down", tabindex: "-1", disabled: i === this.order.length - 1, onclick: () => this.move(index, 1) }),
        i > 0
          ? el("button", { type: "button", class: "tie", text: "Tie with above", "aria-pressed": String(tied), onclick: () => this.toggleTie(index) })
          : null,
        ...this.flagKinds.map((kind) => {
          const box = el("input", { type: "checkbox", class: `flag flag-${kind}`, value: kind, checked: flags.has(kind) });
          box.addEventListener("change", () => this.setFlag(index, kind, box.checked));
          return el("label", {}, box, FLAG_LABELS[kind] ?? kind);
        }),
      );
      const body = el("div", { class: "content" });
      body.append(renderMarkdown(c.content));
      const place = el("div", { class: "place", text: String(places.get(index)) });
      if (tied) place.append(el("small", { text: "tie" }));
      return el(
        "li",
        {
          class: `candidate${tied ? " tied" : ""}`,
          tabindex: "0",
          draggable: "true",
          "aria-label": `Reply at place ${places.get(index)}${tied ? ", tied with the one above" : ""}`,
          dataset: { index, place: places.get(index), tied: String(tied) },
        },
        place,
        body,
        c.finished === false ? el("p", { class: "note muted", text: "Cut off at the token limit." }) : null,
        tools,
      );
    });
    $("candidates").replaceChildren(...items);
    if (focus !== undefined) $("candidates").querySelector(`[data-index="${focus}"]`)?.focus();
  }

  /** A new order; ties whose pair is no longer adjacent are dropped. */
  setOrder(order, focus) {
    this.order = order;
    for (const [c, above] of [...this.tiedAbove]) {
      if (this.order[this.order.indexOf(c) - 1] !== above) this.tiedAbove.delete(c);
    }
    this.renderList(focus);
  }

  move(index, step) {
    const i = this.order.indexOf(index);
    this.moveTo(index, i + step);
  }

  moveTo(index, place) {
    const i = this.order.indexOf(index);
    const j = Math.max(0, Math.min(this.order.length - 1, place));
    if (i === j) return;
    const order = this.order.filter((c) => c !== index);
    order.splice(j, 0, index);
    this.setOrder(order, index);
  }

  toggleTie(index) {
    const i = this.order.indexOf(index);
    if (i <= 0) return;
    if (this.tiedAbove.get(index) === this.order[i - 1]) this.tiedAbove.delete(index);
    else this.tiedAbove.set(index, this.order[i - 1]);
    this.renderList(index);
  }

  setFlag(index, kind, on) {
    const flags = this.flags.get(index) ?? new Set();
    if (on) flags.add(kind);
    else flags.delete(kind);
    this.flags.set(index, flags);
  }

  onKey(e) {
    const item = e.target.closest?.(".candidate");
    if (!item || e.target !== item || e.ctrlKey || e.metaKey || e.altKey) return;
    const index = Number(item.dataset.index);
    const i = this.order.indexOf(index);
    const focusAt = (j) => $("candidates").children[Math.max(0, Math.min(this.order.length - 1, j))]?.focus();
    const key = e.key;
    let handled = true;
    if ((key === "ArrowUp" || key === "ArrowDown") && e.shiftKey) this.move(index, key === "ArrowUp" ? -1 : 1);
    else if (key === "ArrowUp" || key === "k") focusAt(i - 1);
    else if (key === "ArrowDown" || key === "j") focusAt(i + 1);
    else if (key === "Home") focusAt(0);
    else if (key === "End") focusAt(this.order.length - 1);
    else if (/^[1-9]$/.test(key)) this.moveTo(index, Number(key) - 1);
    else if (key === "t" || key === "=") this.toggleTie(index);
    else if (FLAG_KEYS[key] && this.flagKinds.includes(FLAG_KEYS[key])) {
      const kind = FLAG_KEYS[key];
      this.setFlag(index, kind, !(this.flags.get(index)?.has(kind) ?? false));
      this.renderList(index);
    } else if (key === "a") $("all-bad").checked = !$("all-bad").checked;
    else handled = false;
    if (handled) e.preventDefault();
  }

  answerFlags() {
    const flags = {};
    for (const [index, kinds] of this.flags) if (kinds.size) flags[index] = [...kinds];
    return flags;
  }

  async submit() {
    if (!this.task) return;
    this.showError("");
    const ties = this.order.slice(1).filter((c, i) => this.tiedAbove.get(c) === this.order[i]).map((c) => [this.tiedAbove.get(c), c]);
    try {
      await sendJson("POST", `${this.api}/tasks/${this.task.id}/ranking`, {
        order: this.order,
        ties,
        all_bad: $("all-bad").checked,
        flags: this.answerFlags(),
      });
      await this.answered(`Ranking of task #${this.task.id} saved.`);
    } catch (error) {
      this.showError(error.message);
    }
  }

  async skip() {
    if (!this.task) return;
    const typed = $("skip-reason").value.trim();
    const chosen = $("skip-choice").value;
    const reason = typed || (chosen && chosen !== "other" ? chosen : "");
    if (!reason) {
      this.showError("Say why you skip this task: choose a reason or write one.");
      $("skip-reason").focus();
      return;
    }
    this.showError("");
    try {
      await sendJson("POST", `${this.api}/tasks/${this.task.id}/skip`, { reason, flags: this.answerFlags() });
      await this.answered(`Task #${this.task.id} skipped.`);
    } catch (error) {
      this.showError(error.message);
    }
  }

  async answered(message) {
    const link = `/trainer/rank/${this.task.id}`;
    if (this.revisit !== null) {
      this.status(`${message} You can change it again until you leave this page.`);
      this.show(await getJson(`${this.api}/tasks/${this.task.id}`));
      return;
    }
    this.status(message);
    $("rank-status").append(" ", el("a", { href: link, text: "Change it" }));
    await this.next();
    $("candidates").firstElementChild?.focus();
  }
}

const root = document.getElementById("rank-app");
if (root) new RankPage(root).start();
