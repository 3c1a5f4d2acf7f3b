// PhoCLIP search page. What is shown follows the URL (?q=TEXT or ?like=ID, &p=PAGE,
// &item=ID for the detail view), so results can be shared and the back button works.
// Text from the index is always written as text (textContent), never as HTML.
"use strict";
const K = 24;
const MAX_OFFSET = 1000;  // the deepest offset the API pages to (phoclip.serve.settings.MAX_OFFSET)
const $ = (id) => document.getElementById(id);
const state = {shown: null, results: [], vocab: [], upload: null, seq: 0, detailSeq: 0, tagSeq: 0};

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") e.textContent = v; else if (k === "cls") e.className = v; else e.setAttribute(k, v);
  }
  e.append(...children);
  return e;
}
function href(params) { const s = new URLSearchParams(params).toString(); return s ? "?" + s : location.pathname; }
function current() { return new URLSearchParams(location.search); }
function go(params, replace = false, data = {}) {
  history[replace ? "replaceState" : "pushState"](data, "", href(params));
  render();
}
function status(text, loading = false) {
  $("status").textContent = text;
  document.body.classList.toggle("loading", loading);
  $("grid").setAttribute("aria-busy", loading ? "true" : "false");
}
async function api(url, opts) {
  const res = await fetch(url, opts);
  let body = {};
  try { body = await res.json(); } catch (e) { /* an empty or non-JSON answer */ }
  if (!res.ok) {
    throw new Error(res.status === 503 ? "máy chủ đang bận, hãy thử lại sau giây lát" : (body.detail || "HTTP " + res.status));
  }
  return body;
}
function tagLink(tag, score) {
  const a = el("a", {cls: "tag", href: href({q: tag}), text: tag});
  if (score !== undefined) a.append(el("small", {text: score.toFixed(2)}));
  a.addEventListener("click", (e) => { e.preventDefault(); go({q: tag}); });
  return el("li", {}, a);
}

// what is served and the tag vocabulary, asked once; the page searches without them
const ready = Promise.all([api("/health"), api("/tags")]).then(([health, vocab]) => {
  $("meta").textContent = health.images.toLocaleString("vi-VN") + " ảnh · " + health.backend;
  state.vocab = vocab.tags;
  $("suggest").replaceChildren(...state.vocab.slice(0, 12).map((t) => tagLink(t)));
}).catch(() => {});

// ------------------------------------------------------------------ the results grid

function skeleton() {
  if ($("grid").children.length) return;  // keep the old results, dimmed, while loading
  for (let i = 0; i < 12; i++) $("grid").append(el("div", {cls: "skeleton"}));
}
function show(results) {
  const seen = new Set();
  state.results = results.filter((r) => !seen.has(r.id) && seen.add(r.id));
  const p = current();
  $("grid").replaceChildren(...state.results.map((r) => {
    p.set("item", r.id);
    const a = el("a", {href: href(p), "data-id": r.id, "aria-label": r.caption || r.key},
                 el("img", {cls: "thumb", loading: "lazy", src: r.thumb, alt: r.caption || r.key}));
    a.addEventListener("click", (e) => {
      if (e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;  // a new tab: let it open
      e.preventDefault(); openItem(r.id);
    });
    const score = el("div", {cls: "score"}, el("span", {text: "#" + r.rank}), el("span", {text: r.score.toFixed(3)}));
    return el("figure", {cls: "card"}, a, el("figcaption", {}, score, el("div", {cls: "caption", text: r.caption || r.path || r.key})));
  }));
}
function empty(title, text) {
  $("empty").hidden = false; $("empty-title").textContent = title; $("empty-text").textContent = text;
  $("grid").replaceChildren();
}
function pager(page, n) {
  $("prev").hidden = page === 0; $("next").hidden = n < K || (page + 1) * K > MAX_OFFSET;
}

// ------------------------------------------------------------------ what the URL asks for

async function render() {
  const p = current();
  const q = (p.get("q") || "").trim(), like = p.get("like"), page = Math.max(0, parseInt(p.get("p"), 10) || 0);
  const upload = history.state && history.state.upload && state.upload && state.upload.n === history.state.upload;
  const key = q ? "q\n" + q + "\n" + page : like !== null ? "like\n" + like + "\n" + page : upload ? "upload\n" + state.upload.n : "";
  if (document.activeElement !== $("q")) $("q").value = q;
  if (key !== state.shown) {
    state.shown = key;
    if (q) await textSearch(q, page);
    else if (like !== null) await similar(like, page);
    else if (upload) await imageSearch(state.upload);
    else home();
  }
  const item = p.get("item");
  if (item !== null && /^\d+$/.test(item)) showDetail(parseInt(item, 10)); else hideDetail();
}

function home() {
  $("query").hidden = true; $("prev").hidden = $("next").hidden = true; status("");
  empty("Tìm ảnh bằng một câu tiếng Việt", "Gõ một mô tả ở trên, hoặc kéo thả một ảnh vào trang để tìm ảnh giống nó. Thử:");
  document.title = "PhoCLIP — tìm ảnh bằng tiếng Việt";
}

async function run(label, fetcher, done) {
  const seq = ++state.seq;
  $("empty").hidden = true; status(label, true); skeleton();
  try {
    const body = await fetcher();
    if (seq !== state.seq) return;  // a newer search has started: this answer is stale
    status("", false); done(body);
  } catch (err) {
    if (seq !== state.seq) return;
    state.shown = null;  // asked again on the next render
    $("grid").replaceChildren(); status("Lỗi: " + err.message, false);
  }
}

function textSearch(q, page) {
  $("query").hidden = true;
  document.title = q + " — PhoCLIP";
  return run("Đang tìm «" + q + "»…", () => api("/search?" + new URLSearchParams({q: q, k: K, offset: page * K})), (body) => {
    show(body.results); pager(page, body.results.length);
    if (body.results.length) status("Kết quả " + (page * K + 1) + "–" + (page * K + body.results.length) + " cho «" + q + "»");
    else if (page) status("Không còn kết quả cho «" + q + "»");
    else empty("Không tìm thấy ảnh nào cho «" + q + "»", "Thử một mô tả ngắn hơn, ít chi tiết hơn, hoặc một trong các gợi ý:");
  });
}

function similar(id, page) {
  $("query").hidden = false; $("preview").src = "/thumb/" + encodeURIComponent(id); $("query-label").textContent = "Ảnh giống ảnh này";
  $("captions").replaceChildren(); $("query-tags").replaceChildren();
  document.title = "Ảnh tương tự — PhoCLIP";
  return run("Đang tìm ảnh tương tự…", () => api("/items/" + encodeURIComponent(id) + "/similar?" + new URLSearchParams({k: K, offset: page * K})), (body) => {
    show(body.results); pager(page, body.results.length);
    $("query-label").textContent = "Ảnh giống «" + body.query + "»";
    status(body.results.length ? "Ảnh giống «" + body.query + "»: " + (page * K + 1) + "–" + (page * K + body.results.length)
                               : "Không còn ảnh tương tự");
    tagsOf({id: id}, $("query-tags"));
  });
}

function imageSearch(upload) {
  $("query").hidden = false; $("preview").src = upload.url; $("query-label").textContent = upload.file.name || "Ảnh của bạn";
  $("captions").replaceChildren(); $("query-tags").replaceChildren(); $("prev").hidden = $("next").hidden = true;
  document.title = "Tìm theo ảnh — PhoCLIP";
  const fd = new FormData(); fd.append("file", upload.file); fd.append("k", K);
  return run("Đang tìm theo ảnh…", () => api("/search/image", {method: "POST", body: fd}), (body) => {
    show(body.images);
    const seen = new Set();
    const caps = body.captions.filter((c) => { const t = c.caption.trim().toLowerCase(); return !seen.has(t) && seen.add(t); });
    $("captions").replaceChildren(...caps.slice(0, 5).map((c) => {
      const a = el("a", {href: href({q: c.caption}), text: c.caption});
      a.addEventListener("click", (e) => { e.preventDefault(); go({q: c.caption}); });
      return el("li", {}, a, el("span", {cls: "cscore", text: c.score.toFixed(3)}));
    }));
    status("Ảnh tương tự" + (caps.length ? " và chú thích phù hợp" : ""));
    tagsOf({file: upload.file}, $("query-tags"));
  });
}

function searchByFile(file) {
  if (!file) return;
  if (state.upload) URL.revokeObjectURL(state.upload.url);
  const n = (state.upload ? state.upload.n : 0) + 1;
  state.upload = {file: file, url: URL.createObjectURL(file), n: n};
  history.pushState({upload: n}, "", location.pathname);
  render();
}

// ------------------------------------------------------------------ zero-shot tags

async function tagsOf(what, list) {
  const token = String(++state.tagSeq);
  list.replaceChildren(); list.dataset.token = token;
  await ready;  // the vocabulary (a page opened on a shared URL asks before it has it)
  if (!state.vocab.length || list.dataset.token !== token) return;
  const fd = new FormData(); fd.append("tags", state.vocab.join("\n")); fd.append("k", 5);
  if (what.file) fd.append("file", what.file); else fd.append("id", what.id);
  let items;
  try {
    const body = await api("/tags", {method: "POST", body: fd});
    items = body.tags.map((t) => tagLink(t.tag, t.score));
  } catch (err) {
    items = [el("li", {cls: "cscore", text: "(không có nhãn: " + err.message + ")"})];
  }
  if (list.dataset.token === token) list.replaceChildren(...items);  // else another image's tags were asked since
}

// ------------------------------------------------------------------ the detail view

function openItem(id) {
  const p = current(); p.set("item", id);
  history.pushState({detail: true}, "", href(p));
  render();
}
function closeDetail() {
  if (history.state && history.state.detail) { history.back(); return; }
  const p = current(); p.delete("item"); go(p, true);
}
function step(delta) {
  const p = current(), id = parseInt(p.get("item"), 10);
  const at = state.results.findIndex((r) => r.id === id);
  if (at < 0 || !state.results[at + delta]) return;
  p.set("item", state.results[at + delta].id);
  history.replaceState(history.state, "", href(p));
  render();
}
async function showDetail(id) {
  const d = $("detail");
  if (!d.open) d.showModal();
  if (d.dataset.id === String(id)) return;
  d.dataset.id = String(id);
  const seq = ++state.detailSeq;
  const at = state.results.findIndex((r) => r.id === id), hit = state.results[at];
  $("d-photo").src = "/photo/" + id; $("d-photo").alt = hit ? (hit.caption || hit.key) : "";
  $("d-title").textContent = hit ? hit.key : "Ảnh " + id;
  $("d-score").replaceChildren(...(hit ? [el("span", {text: "#" + hit.rank}), el("span", {text: "độ giống " + hit.score.toFixed(3)})] : []));
  $("d-captions").replaceChildren(); $("d-source").replaceChildren(); $("d-tags").replaceChildren();
  $("d-similar").href = href({like: id});
  $("d-prev").disabled = at <= 0; $("d-next").disabled = at < 0 || at >= state.results.length - 1;
  tagsOf({id: id}, $("d-tags"));
  try {
    const item = await api("/items/" + id);
    if (seq !== state.detailSeq) return;
    $("d-title").textContent = item.key || "Ảnh " + id;
    $("d-captions").replaceChildren(...(item.captions.length ? item.captions : ["(không có chú thích)"]).map((c) => el("li", {text: c})));
    const rows = [["Khoá", item.key], ["Bộ dữ liệu", item.source], ["Tệp", item.path], ["Shard", item.shard], ["Số", String(item.id)]];
    $("d-source").replaceChildren(...rows.filter((r) => r[1]).flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {text: v})]));
  } catch (err) {
    if (seq === state.detailSeq) $("d-captions").replaceChildren(el("li", {text: "Lỗi: " + err.message}));
  }
}
function hideDetail() {
  const d = $("detail");
  delete d.dataset.id;
  if (d.open) d.close();
}

// ------------------------------------------------------------------ wiring

$("f").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (q) { $("q").blur(); go({q: q}); }
});
$("prev").addEventListener("click", () => { const p = current(); const n = (parseInt(p.get("p"), 10) || 0) - 1; if (n > 0) p.set("p", n); else p.delete("p"); p.delete("item"); go(p); });
$("next").addEventListener("click", () => { const p = current(); p.set("p", (parseInt(p.get("p"), 10) || 0) + 1); p.delete("item"); go(p); });
$("file").addEventListener("change", (e) => { searchByFile(e.target.files[0]); e.target.value = ""; });
$("d-close").addEventListener("click", closeDetail);
$("d-prev").addEventListener("click", () => step(-1));
$("d-next").addEventListener("click", () => step(1));
$("d-similar").addEventListener("click", (e) => { e.preventDefault(); go({like: $("detail").dataset.id}); });
$("detail").addEventListener("cancel", (e) => { e.preventDefault(); closeDetail(); });  // Esc
$("detail").addEventListener("click", (e) => { if (e.target === $("detail")) closeDetail(); });  // the backdrop
window.addEventListener("popstate", render);
document.addEventListener("keydown", (e) => {
  const typing = /^(INPUT|TEXTAREA)$/.test(document.activeElement.tagName);
  if ($("detail").open) {
    if (e.key === "ArrowLeft") { e.preventDefault(); step(-1); }
    if (e.key === "ArrowRight") { e.preventDefault(); step(1); }
  } else if (e.key === "/" && !typing) { e.preventDefault(); $("q").focus(); $("q").select(); }
  else if (e.key === "Escape" && typing) $("q").blur();
});
let dragging = 0;  // dragenter/leave fire for every child crossed
window.addEventListener("dragenter", (e) => { if (e.dataTransfer.types.includes("Files")) { dragging++; $("drop").hidden = false; } });
window.addEventListener("dragleave", () => { if (--dragging <= 0) { dragging = 0; $("drop").hidden = true; } });
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault(); dragging = 0; $("drop").hidden = true;
  if (e.dataTransfer.files[0]) searchByFile(e.dataTransfer.files[0]);
});

render();
