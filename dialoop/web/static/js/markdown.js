// Markdown to DOM nodes, never through HTML: every piece of text lands in a node via textContent or
// createTextNode, so nothing a user or a model writes can become an element, an attribute or a script.
// Supported: paragraphs, headings, fenced and indented code, block quotes, lists, tables, rules,
// inline code, bold, italic, strikethrough, and links whose scheme is http, https or mailto.

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The URL when its scheme is safe to link to, else null (javascript:, data:, vbscript: ... stay text). */
export function safeUrl(raw) {
  try {
    const url = new URL(raw, window.location.href);
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

function link(text, href) {
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  appendInline(a, text, true);
  return a;
}

// Inline rules, tried at every position; the earliest match wins, then the longest rule listed first.
const INLINE = [
  { re: /`+/y, kind: "code" },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/y, kind: "strong" },
  { re: /__(?=\S)([\s\S]*?\S)__(?!\w)/y, kind: "strong" },
  { re: /~~(?=\S)([\s\S]*?\S)~~/y, kind: "del" },
  { re: /\*(?=[^\s*])([\s\S]*?[^\s*])\*/y, kind: "em" },
  { re: /(?<!\w)_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/y, kind: "em" },
  { re: /!?\[([^\]\n]*)\]\(\s*<?([^\s()<>]+(?:\([^\s()]*\))?[^\s()<>]*)>?(?:\s+"[^"\n]*")?\s*\)/y, kind: "link" },
  { re: /<((?:https?:\/\/|mailto:)[^\s<>]+)>/y, kind: "autolink" },
  { re: /https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"\]]/y, kind: "url" },
];
const INLINE_START = /[`*_~![<h]/g;

const LINK_KINDS = new Set(["link", "autolink", "url"]);

/** Append `text` with inline markdown to `parent` as DOM nodes (`inLink`: no links inside a link). */
export function appendInline(parent, text, inLink = false) {
  let plain = "";
  const flush = () => {
    if (plain) parent.appendChild(document.createTextNode(plain));
    plain = "";
  };
  let i = 0;
  while (i < text.length) {
    INLINE_START.lastIndex = i;
    const found = INLINE_START.exec(text);
    if (!found) break;
    plain += text.slice(i, found.index);
    i = found.index;
    let matched = false;
    for (const rule of INLINE) {
      if (inLink && LINK_KINDS.has(rule.kind)) continue;
      rule.re.lastIndex = i;
      const m = rule.re.exec(text);
      if (!m) continue;
      if (rule.kind === "code") {
        // a code span ends at the next run of exactly as many backticks
        const fence = m[0];
        const end = text.indexOf(fence, i + fence.length);
        if (end < 0) continue;
        flush();
        let body = text.slice(i + fence.length, end);
        if (/^ .* $/.test(body) && body.trim()) body = body.slice(1, -1);
        parent.appendChild(el("code", "", body));
        i = end + fence.length;
      } else if (rule.kind === "link") {
        const href = safeUrl(m[2]);
        flush();
        // images are shown as links: loading a model-chosen URL would leak the page to that host
        if (href) parent.appendChild(link(m[1] || m[2], href));
        else appendInline(parent, m[1], inLink);
        i += m[0].length;
      } else if (rule.kind === "autolink" || rule.kind === "url") {
        const raw = rule.kind === "autolink" ? m[1] : m[0];
        const href = safeUrl(raw);
        flush();
        if (href) parent.appendChild(link(raw, href));
        else parent.appendChild(document.createTextNode(m[0]));
        i += m[0].length;
      } else {
        flush();
        const node = el(rule.kind);
        appendInline(node, m[1], inLink);
        parent.appendChild(node);
        i += m[0].length;
      }
      matched = true;
      break;
    }
    if (!matched) {
      plain += text[i];
      i += 1;
    }
  }
  plain += text.slice(i);
  flush();
}

function appendLines(parent, lines) {
  lines.forEach((line, k) => {
    if (k > 0) parent.appendChild(el("br"));
    appendInline(parent, line);
  });
}

function codeBlock(code, lang) {
  const wrap = el("div", "code-block");
  const bar = el("div", "code-bar");
  bar.appendChild(el("span", "code-lang", lang || "text"));
  const copy = el("button", "code-copy", "Copy");
  copy.type = "button";
  copy.addEventListener("click", () => {
    navigator.clipboard?.writeText(code).then(
      () => {
        copy.textContent = "Copied";
        setTimeout(() => (copy.textContent = "Copy"), 1500);
      },
      () => {},
    );
  });
  bar.appendChild(copy);
  const pre = el("pre");
  const codeEl = el("code", "", code);
  if (lang) codeEl.dataset.lang = lang;
  pre.appendChild(codeEl);
  wrap.append(bar, pre);
  return wrap;
}

const RE = {
  fence: /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/,
  heading: /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/,
  rule: /^ {0,3}([-*_])(\s*\1){2,}\s*$/,
  quote: /^ {0,3}> ?(.*)$/,
  item: /^( {0,3})([-*+]|\d{1,9}[.)])\s+(.*)$/,
  indented: /^( {4}|\t)(.*)$/,
  tableSep: /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/,
};

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"));
}

function table(header, rows) {
  const t = el("table");
  const head = el("thead");
  const tr = el("tr");
  for (const cell of header) {
    const th = el("th");
    appendInline(th, cell);
    tr.appendChild(th);
  }
  head.appendChild(tr);
  const body = el("tbody");
  for (const row of rows) {
    const r = el("tr");
    for (let k = 0; k < header.length; k++) {
      const td = el("td");
      appendInline(td, row[k] ?? "");
      r.appendChild(td);
    }
    body.appendChild(r);
  }
  t.append(head, body);
  const wrap = el("div", "table-wrap");
  wrap.appendChild(t);
  return wrap;
}

function isBlockStart(line) {
  return RE.fence.test(line) || RE.heading.test(line) || RE.quote.test(line) || RE.item.test(line) || RE.rule.test(line);
}

/** Render markdown `text` into a DocumentFragment (an unterminated code fence runs to the end: streaming). */
export function renderMarkdown(text) {
  const frag = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i += 1;
      continue;
    }
    let m = RE.fence.exec(line);
    if (m) {
      const fence = m[1];
      const body = [];
      i += 1;
      while (i < lines.length && !(lines[i].trim().startsWith(fence) && !lines[i].trim().slice(fence.length).trim())) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1;
      frag.appendChild(codeBlock(body.join("\n"), m[2]));
      continue;
    }
    m = RE.heading.exec(line);
    if (m) {
      const h = el(`h${m[1].length}`);
      appendInline(h, m[2]);
      frag.appendChild(h);
      i += 1;
      continue;
    }
    if (RE.rule.test(line)) {
      frag.appendChild(el("hr"));
      i += 1;
      continue;
    }
    if (RE.quote.test(line)) {
      const body = [];
      while (i < lines.length && lines[i].trim() && (m = RE.quote.exec(lines[i]))) {
        body.push(m[1]);
        i += 1;
      }
      const q = el("blockquote");
      q.appendChild(renderMarkdown(body.join("\n")));
      frag.appendChild(q);
      continue;
    }
    m = RE.item.exec(line);
    if (m) {
      const ordered = /\d/.test(m[2]);
      const list = el(ordered ? "ol" : "ul");
      if (ordered && parseInt(m[2], 10) !== 1) list.start = parseInt(m[2], 10);
      const baseIndent = m[1].length;
      while (i < lines.length) {
        const im = RE.item.exec(lines[i]);
        if (!im || im[1].length !== baseIndent || /\d/.test(im[2]) !== ordered) break;
        const contentIndent = im[1].length + im[2].length + 1;
        const body = [im[3]];
        i += 1;
        // continuation: indented lines (nested lists, code) and lazy paragraph lines
        while (i < lines.length) {
          const next = lines[i];
          const indent = next.length - next.trimStart().length;
          if (next.trim() && indent >= Math.min(contentIndent, baseIndent + 2)) {
            body.push(next.slice(Math.min(indent, contentIndent)));
          } else if (next.trim() && !isBlockStart(next) && body[body.length - 1].trim()) {
            body.push(next);
          } else if (!next.trim() && i + 1 < lines.length && lines[i + 1].length - lines[i + 1].trimStart().length >= contentIndent) {
            body.push("");
          } else {
            break;
          }
          i += 1;
        }
        const li = el("li");
        if (body.length === 1) appendInline(li, body[0]);
        else li.appendChild(renderMarkdown(body.join("\n")));
        list.appendChild(li);
        while (i < lines.length && !lines[i].trim() && i + 1 < lines.length && RE.item.test(lines[i + 1])) i += 1;
      }
      frag.appendChild(list);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && RE.tableSep.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      const header = splitRow(line);
      const rows = [];
      i += 2;
      while (i < lines.length && lines[i].trim() && lines[i].includes("|")) {
        rows.push(splitRow(lines[i]));
        i += 1;
      }
      frag.appendChild(table(header, rows));
      continue;
    }
    m = RE.indented.exec(line);
    if (m) {
      const body = [];
      while (i < lines.length && (RE.indented.test(lines[i]) || (!lines[i].trim() && i + 1 < lines.length && RE.indented.test(lines[i + 1])))) {
        body.push(lines[i].replace(/^( {4}|\t)/, ""));
        i += 1;
      }
      frag.appendChild(codeBlock(body.join("\n"), ""));
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && (para.length === 0 || !isBlockStart(lines[i]))) {
      para.push(lines[i]);
      i += 1;
    }
    const p = el("p");
    appendLines(p, para);
    frag.appendChild(p);
  }
  return frag;
}
