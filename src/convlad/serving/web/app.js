"use strict";
const $ = (id) => document.getElementById(id);
let query = null;   // {kind: "upload", qid} or {kind: "id", id}: what the match view verifies against
let results = [];
let last = null;    // the last search, to ask again for more: {kind: "file", file} or {kind: "id", id}
let k = null;       // results asked for; the server's default until "More results"
const PAGE = 24;    // photos a page when browsing
let config = null;  // the search's defaults, from the server
api("/api/config").then((c) => {
  config = c;
  document.querySelector(".token").hidden = !c.token_required;  // only where the server asks for one
}).catch(() => {});

function showError(msg) { const e = $("error"); e.textContent = msg; e.style.display = msg ? "block" : "none"; }
function authHeaders() { const t = $("token").value.trim(); return t ? {"Authorization": "Bearer " + t} : {}; }
$("token").value = localStorage.getItem("convlad-token") || "";
$("token").addEventListener("change", () => localStorage.setItem("convlad-token", $("token").value.trim()));

async function api(url, opts = {}) {
  const r = await fetch(url, opts);
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
  if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
  return body;
}
async function refreshStats() {
  try { const s = await api("/api/stats");
    $("stats").textContent = `${s.images.toLocaleString()} photos`;
    $("stats").title = `search structure: ${s.search}`;
    if (!results.length && !query && !s.images)
      $("grid").replaceChildren(el("div", "empty", "This index holds no photos yet: add one with “Add photo”."));
  } catch (e) { $("stats").textContent = "server unreachable"; }
}
// Text from the server (paths above all) goes in as text, never as markup.
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; }
function render(list, label, group = null) {
  results = list; $("groupsview").hidden = true; $("grid").hidden = false;
  const qg = $("qgroup"); qg.hidden = !group;  // the query's group: itself, or its first same result's
  if (group) { qg.textContent = `In group ${group.id}: ${group.size} photos of the same thing`; qg.onclick = () => showGroup(group.id); }
  $("status").textContent = list.length ? label : "No results.";
  const grid = $("grid"); grid.replaceChildren();
  list.forEach((r, n) => {
    const c = el("div", "card"); c.tabIndex = 0; c.dataset.id = r.id; c.dataset.n = n;
    const thumb = el("div", "thumb"); thumb.title = "Search with this photo";
    const img = el("img"); img.loading = "lazy"; img.alt = ""; img.src = r.thumbnail; thumb.append(img);
    const meta = el("div", "meta"), row = el("div", "row");
    const linked = r.via === null || r.via === undefined ? "" : ` · linked through photo ${r.via}`;
    const verified = r.inliers === null || r.inliers === undefined ? "" : ` · ${r.inliers} matching features${linked}`;
    if (r.same !== null && r.same !== undefined) {  // the groups' rule: the same thing, or only alike
      c.classList.add(r.same ? "same" : "alike");
      thumb.append(el("span", "badge", r.same ? "same object or place" : "looks alike"));
    }
    if (r.rank !== undefined) {
      const d = el("span", "dist", `distance ${r.distance.toFixed(3)}${verified}`);
      d.title = "distance: how far the photo's global descriptor is from the query's (0: the same); " +
                "matching features: local features that agree on one geometry with the query's; " +
                "linked: the index holds a verified pair of this photo and a sure match of the query";
      row.append(el("span", "rank", `#${r.rank}`), d);
    } else {
      row.append(el("span", "rank", `photo ${r.id}`));
    }
    const path = el("div", "path", r.path); path.title = r.path;
    const acts = el("div", "acts"), mb = el("button", "match", "Match view"), db = el("button", "del", "Delete");
    db.title = "Delete from the index"; acts.append(mb, db);
    meta.append(row, ...(r.rank !== undefined ? [el("div", "id", `id ${r.id}`)] : []), path, acts); c.append(thumb, meta);
    thumb.onclick = () => searchId(r.id);
    mb.onclick = () => openMatch(r);
    db.onclick = () => del(r);
    c.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") searchId(r.id);
      else if (ev.key === "m") openMatch(r);
      else if (ev.key === "ArrowRight") grid.children[Math.min(n + 1, list.length - 1)].focus();
      else if (ev.key === "ArrowLeft") grid.children[Math.max(n - 1, 0)].focus();
    });
    grid.appendChild(c);
  });
}
function orderNote() {
  return config && config.rerank ? ` · the top ${config.rerank} ordered by matching features, then by distance` : " · nearest first";
}

function clearResults(label) {  // no results shown under a query they do not belong to
  results = []; query = null; $("grid").replaceChildren(); $("status").textContent = label || "";
  $("qgroup").hidden = true; $("more").hidden = true; $("pager").hidden = true; $("groupsview").hidden = true;
}
function kParam() { return k ? `?k=${k}` : ""; }
function showMore(n) {
  const cap = config ? config.caps.k : 100;
  $("more").hidden = !(n >= (k || (config ? config.k : 10)) && (k || 0) < cap);
}
async function searchFile(file, again = false) {
  showError("");
  if (!file) return;
  if (!again) { k = null; $("qimg").src = URL.createObjectURL(file); $("qimg").hidden = false; }
  $("status").textContent = "Searching…";
  const fd = new FormData(); fd.append("image", file, file.name || "pasted.png");
  try {
    const t = performance.now();
    const r = await api(`/api/search${kParam()}`, {method: "POST", body: fd});  // defaults: /api/config
    query = {kind: "upload", qid: r.query}; last = {kind: "file", file};
    $("pager").hidden = true;
    render(r.results, `${r.results.length} photos in ${Math.round(performance.now() - t)} ms${orderNote()}`, r.group);
    showMore(r.results.length);
  } catch (e) {
    showError(e.message);
    clearResults("The search failed: no results shown.");
    $("qimg").hidden = true;
  }
}
async function searchId(id, again = false) {
  showError("");
  if (!again) k = null;
  try {
    const r = await api(`/api/similar/${id}${kParam()}`);
    query = {kind: "id", id}; last = {kind: "id", id};
    $("qimg").src = `/api/images/${id}/thumbnail`; $("qimg").hidden = false;
    $("pager").hidden = true;
    render(r.results, `${r.results.length} photos like photo ${id}${orderNote()}`, r.group);
    showMore(r.results.length);
    if (!again) window.scrollTo({top: 0, behavior: "smooth"});
  } catch (e) { showError(e.message); clearResults("The search failed: no results shown."); }
}
function more() {
  const step = config ? config.k : 10, cap = config ? config.caps.k : 100;
  k = Math.min(cap, (k || step) + step * 2);
  if (last && last.kind === "file") searchFile(last.file, true);
  else if (last) searchId(last.id, true);
}
async function browse(offset) {
  showError("");
  try {
    const r = await api(`/api/images?offset=${offset}&limit=${PAGE}`);
    query = null; last = null; $("qimg").hidden = true; $("more").hidden = true;
    const end = Math.min(r.total, offset + r.images.length);
    render(r.images, r.total ? `Photos ${offset + 1}–${end} of ${r.total.toLocaleString()} in the index (in index order)` : "");
    pager(offset, PAGE, end, r.total, browse);
  } catch (e) { showError(e.message); }
}
function pager(offset, size, end, total, go) {  // Previous / page N of M / Next, for browse and groups
  $("pager").hidden = total <= size;
  $("pageinfo").textContent = `page ${Math.floor(offset / size) + 1} of ${Math.max(1, Math.ceil(total / size))}`;
  $("prev").disabled = offset === 0; $("next").disabled = end >= total;
  $("prev").onclick = () => go(Math.max(0, offset - size));
  $("next").onclick = () => go(offset + size);
}
// Groups: which photos show the same thing, a page of groups at a time; each member says why it is
// there (the photo it joins through, their matching features), and opens that pair's match view.
const GROUPS_PAGE = 8;
function memberCard(m, g) {
  const c = el("div", "card" + (m.duplicate_of !== null ? " dup" : "")); c.tabIndex = 0; c.dataset.id = m.id;
  const thumb = el("div", "thumb"); thumb.title = "Search with this photo";
  const img = el("img"); img.loading = "lazy"; img.alt = ""; img.src = m.thumbnail; thumb.append(img);
  const meta = el("div", "meta");
  const why = m.via === null ? "the group's representative"
    : m.second_look
      ? `via photo ${m.via}: a second look, ${m.inliers} ASIFT matches, similarity ${m.similarity.toFixed(2)}`
      : `via photo ${m.via}: ${m.inliers === null ? "?" : m.inliers} matching features, similarity ${m.similarity.toFixed(2)}`;
  meta.append(el("div", "rank", `photo ${m.id}`), el("div", "why", why));
  if (m.duplicate_of !== null) meta.append(el("div", "why", `a duplicate of photo ${m.duplicate_of}`));
  const path = el("div", "path", m.path); path.title = m.path; meta.append(path);
  if (m.via !== null) {
    const mb = el("button", "match", "Match view"); mb.title = `The verification of photo ${m.id} with photo ${m.via}`;
    mb.onclick = () => openPair(m.id, m.via, `Match view: photo ${m.via} → photo ${m.id} (${m.path})`);
    const acts = el("div", "acts"); acts.append(mb); meta.append(acts);
  }
  thumb.onclick = () => searchId(m.id);
  c.addEventListener("keydown", (ev) => { if (ev.key === "Enter") searchId(m.id); });
  c.append(thumb, meta);
  return c;
}
function groupBox(g) {
  const box = el("section", "group"); box.dataset.id = g.id;
  const h = el("h3", null, `Group ${g.id}: ${g.size} photos`);
  const dups = g.members.filter((m) => m.duplicate_of !== null).length;
  if (dups) h.append(el("span", "note", `${dups} duplicate${dups > 1 ? "s" : ""}`));
  const members = el("div", "members"); g.members.forEach((m) => members.append(memberCard(m, g)));
  box.append(h, members);
  return box;
}
async function showGroup(id) {  // one group, from a search: the query's
  showError("");
  try {
    const g = await api(`/api/groups/${id}`);
    query = null; last = null; results = []; $("more").hidden = true; $("pager").hidden = true; $("qgroup").hidden = true;
    $("grid").replaceChildren(); $("grid").hidden = true;
    const view = $("groupsview"); view.replaceChildren(groupBox(g)); view.hidden = false;
    $("status").textContent = `Group ${g.id}: the photos the index's verified pairs join with it`;
  } catch (e) { showError(e.message); }
}
async function showGroups(offset) {
  showError("");
  try {
    const r = await api(`/api/groups?offset=${offset}&limit=${GROUPS_PAGE}`);
    query = null; last = null; results = []; $("qimg").hidden = true; $("more").hidden = true; $("qgroup").hidden = true;
    $("grid").replaceChildren(); $("grid").hidden = true;
    const view = $("groupsview"); view.replaceChildren(); view.hidden = false;
    r.groups.forEach((g) => view.append(groupBox(g)));
    const end = Math.min(r.total, offset + r.groups.length);
    $("status").textContent = r.total ? `Groups ${offset + 1}–${end} of ${r.total.toLocaleString()}, largest first: ` +
      "photos the index's verified pairs join" : "No groups: no two photos of this index verify as the same thing.";
    pager(offset, GROUPS_PAGE, end, r.total, showGroups);
  } catch (e) { showError(e.message); }
}
function openPair(id, withId, title) {
  $("mtitle").textContent = title;
  $("mimg").src = `/api/match/${id}?with_id=${withId}`;
  $("modal").style.display = "flex"; $("mclose").focus();
}
function openMatch(r) {
  if (!query) { showError("The match view compares a photo with a query: search first."); return; }
  const q = query.kind === "upload" ? `query=${query.qid}` : `with_id=${query.id}`;
  $("mtitle").textContent = `Match view: query → #${r.rank} ${r.path}`;
  $("mimg").src = `/api/match/${r.id}?${q}`;
  $("modal").style.display = "flex"; $("mclose").focus();
}
function closeMatch() { $("modal").style.display = "none"; $("mimg").removeAttribute("src"); }
async function del(r) {
  if (!confirm(`Delete ${r.path} from the index?`)) return;
  try {
    await api(`/api/images/${r.id}`, {method: "DELETE", headers: authHeaders()});
    render(results.filter((x) => x.id !== r.id), `Deleted ${r.path}.`);
    refreshStats().then(() => { if (!query && !results.length) browse(0); });
  } catch (e) { showError(e.message); }
}
async function add(file) {
  showError("");
  const fd = new FormData(); fd.append("image", file, file.name);
  try {
    const r = await api("/api/images", {method: "POST", body: fd, headers: authHeaders()});
    $("status").textContent = `Added ${file.name} as photo ${r.id}; searching with it…`;
    refreshStats(); searchId(r.id);
  } catch (e) { showError(e.message); }
}

const drop = $("drop");
drop.onclick = () => $("pick").click();
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("pick").click(); });
$("pick").onchange = () => { searchFile($("pick").files[0]); $("pick").value = ""; };
$("add").onclick = () => $("addfile").click();
$("addfile").onchange = () => { if ($("addfile").files[0]) add($("addfile").files[0]); $("addfile").value = ""; };
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => searchFile(e.dataTransfer.files[0]));
document.addEventListener("paste", (e) => {
  const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
  if (item) searchFile(item.getAsFile());
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape") closeMatch();
  else if (e.key === "/" && document.activeElement.tagName !== "INPUT") { e.preventDefault(); $("pick").click(); }
});
$("more").onclick = more;
$("browse").onclick = () => browse(0);
$("groups").onclick = () => showGroups(0);
$("mclose").onclick = closeMatch;
$("modal").onclick = (e) => { if (e.target === $("modal")) closeMatch(); };
refreshStats().then(() => { if (!query && !results.length) browse(0); });
