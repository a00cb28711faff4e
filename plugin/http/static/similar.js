// drh-pacs similar-cases page. Talks to the service's public interfaces only: the DICOMweb roots
// (/dicom-web/similar for the search, /dicom-web for the reference study and the thumbnails) and the
// JSON upload search (/api/similar/upload). The browser's session cookie authenticates every call.
// Values from the archive are only ever written with textContent or as attribute values.
"use strict";

const PRIVATE_CREATOR = "DRH-PACS 1";
const THUMBS_PER_ROW = 8;
const state = { config: null, mode: null, file: null, uploadPatient: "" };
const $ = (id) => document.getElementById(id);

// -- DICOM JSON ------------------------------------------------------------------------------
function value(ds, tag) {
  const el = ds && ds[tag];
  if (!el || !el.Value || !el.Value.length) return "";
  const v = el.Value[0];
  if (el.vr === "PN") return (v && v.Alphabetic) || "";
  return v;
}
// A DICOM person name (Family^Given^Middle^Prefix^Suffix) as people write it: "Family, Given Middle".
function personName(pn) {
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = String(pn || "").split("^");
  const first = [prefix, given, middle].filter(Boolean).join(" ");
  return [family, [first, suffix].filter(Boolean).join(" ")].filter(Boolean).join(", ");
}
// The rank and score drh-pacs puts before a similar answer's StudyDescription, for viewers that drop
// private elements ("#01 0.938 CHEST PA"): the page shows rank and score on their own.
const RANKED_DESCRIPTION = /^#\d+ \d+\.\d{3}(?: |$)/;
function values(ds, tag) {
  const el = ds && ds[tag];
  return el && el.Value ? el.Value : [];
}
// Our private elements, wherever the answer put our creator's block.
function privateValue(ds, element) {
  for (let block = 0x10; block <= 0xff; block++) {
    const creatorTag = "0099" + "00" + block.toString(16).toUpperCase().padStart(2, "0");
    if (value(ds, creatorTag) === PRIVATE_CREATOR) {
      return value(ds, "0099" + block.toString(16).toUpperCase().padStart(2, "0") + element);
    }
  }
  return "";
}
function studyFromDicom(ds) {
  const rank = privateValue(ds, "04");
  const description = String(value(ds, "00081030") || "");
  return {
    uid: value(ds, "0020000D"),
    patientId: value(ds, "00100020"),
    patientName: personName(value(ds, "00100010")),
    date: String(value(ds, "00080020") || ""),
    description: rank === "" ? description : description.replace(RANKED_DESCRIPTION, ""),
    accession: value(ds, "00080050"),
    modalities: values(ds, "00080061").join(", "),
    images: value(ds, "00201208"),
    rank,
    distance: privateValue(ds, "05"),
    score: privateValue(ds, "06"),
  };
}
function studyFromJson(r) {
  const s = r.study;
  return {
    uid: s.study_instance_uid, patientId: s.patient_id, patientName: personName(s.patient_name), date: s.study_date,
    description: s.study_description, accession: s.accession_number, modalities: (s.modalities || []).join(", "),
    images: s.number_of_instances, rank: r.rank, distance: r.distance, score: r.score,
  };
}

// -- small helpers -----------------------------------------------------------------------------
function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
const dicomDate = (d) => (d ? d.replaceAll("-", "") : "");
const showDate = (d) => (d && d.length === 8 ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : d || "");
function message(text, isError = false) {
  const m = $("message");
  m.textContent = text;
  m.classList.toggle("error", isError);
}
async function api(url, options = {}) {
  const response = await fetch(url, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    location.href = "/login?next=" + encodeURIComponent(location.pathname + location.search);
    throw new Error("not logged in");
  }
  let body = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) body = await response.json();
  if (!response.ok) throw new Error((body && (body.detail || body.error)) || `HTTP ${response.status}`);
  return body;
}
function thumbUrl(study, series, sop) {
  return `/dicom-web/studies/${study}/series/${series}/instances/${sop}/thumbnail`;
}

// -- the form and the URL ----------------------------------------------------------------------
function filters() {
  return {
    k: $("k").value,
    modality: $("modality").value.trim().toUpperCase(),
    dateFrom: dicomDate($("date-from").value),
    dateTo: dicomDate($("date-to").value),
    patients: document.querySelector("input[name=patients]:checked").value,
  };
}
function syncReferenceKind() {
  const accession = $("ref-kind").value === "accession";
  $("ref-patient-box").hidden = !accession;
  $("ref").placeholder = accession ? "Accession number  (press / to type here)" : "Study Instance UID  (press / to type here)";
}
function remember() {
  const f = filters();
  const p = new URLSearchParams();
  if (state.mode === "reference") {
    p.set($("ref-kind").value === "accession" ? "accession" : "study", $("ref").value.trim());
    if ($("ref-kind").value === "accession" && $("ref-patient").value.trim()) p.set("patient", $("ref-patient").value.trim());
  }
  if (f.k !== String(state.config.default_k)) p.set("k", f.k);
  if (f.modality) p.set("modality", f.modality);
  if (f.dateFrom) p.set("date_from", f.dateFrom);
  if (f.dateTo) p.set("date_to", f.dateTo);
  if (f.patients !== "all") p.set("patients", f.patients);
  history.replaceState(null, "", "/similar" + (p.toString() ? "?" + p : ""));
}
function restore() {
  const p = new URLSearchParams(location.search);
  const k = p.get("k") || String(state.config.default_k);
  if (![...$("k").options].some((o) => o.value === k)) $("k").append(el("option", {}, k));
  $("k").value = k;
  $("modality").value = p.get("modality") || "";
  const iso = (d) => (d && d.length === 8 ? showDate(d) : "");
  $("date-from").value = iso(p.get("date_from"));
  $("date-to").value = iso(p.get("date_to"));
  const patients = p.get("patients") || "all";
  const radio = document.querySelector(`input[name=patients][value="${["all", "same", "other"].includes(patients) ? patients : "all"}"]`);
  radio.checked = true;
  if (p.get("accession")) {
    $("ref-kind").value = "accession";
    $("ref").value = p.get("accession");
    $("ref-patient").value = p.get("patient") || "";
  } else if (p.get("study")) {
    $("ref").value = p.get("study");
  }
  syncReferenceKind();
  return Boolean(p.get("accession") || p.get("study"));
}

// -- searching ---------------------------------------------------------------------------------
async function searchByReference() {
  const ref = $("ref").value.trim();
  if (!ref) {
    message("Type a Study Instance UID or an accession number, or drop an image.", true);
    $("ref").focus();
    return;
  }
  state.mode = "reference";
  remember();
  message("Searching…");
  const f = filters();
  // The reference study itself, from the plain root: its details, its patient for "same patient".
  const lookup = new URLSearchParams();
  if ($("ref-kind").value === "accession") {
    lookup.set("AccessionNumber", ref);
    if ($("ref-patient").value.trim()) lookup.set("PatientID", $("ref-patient").value.trim());
  } else {
    lookup.set("StudyInstanceUID", ref);
  }
  let found;
  try {
    found = await api("/dicom-web/studies?" + lookup, { headers: { Accept: "application/dicom+json" } });
  } catch (err) {
    return fail(err);
  }
  if (!found || !found.length) return fail(new Error("No study here with that reference."));
  if (found.length > 1) return fail(new Error(`${found.length} studies have that accession number: add the Patient ID.`));
  const reference = studyFromDicom(found[0]);
  const q = new URLSearchParams({ StudyInstanceUID: reference.uid, limit: f.k });
  if (f.modality) q.set("ModalitiesInStudy", f.modality);
  if (f.dateFrom || f.dateTo) q.set("StudyDate", `${f.dateFrom}-${f.dateTo}`);
  if (f.patients === "same") {
    if (!reference.patientId) return fail(new Error("The reference study names no patient: 'same patient' cannot apply."));
    q.set("PatientID", reference.patientId);
  }
  if (f.patients === "other") q.set("DRHExcludeReferencePatient", "YES");
  q.set("includefield", "StudyDescription,NumberOfStudyRelatedInstances");
  let answers;
  try {
    answers = await api("/dicom-web/similar/studies?" + q, { headers: { Accept: "application/dicom+json" } });
  } catch (err) {
    return fail(err);
  }
  showReferenceStudy(reference);
  showResults((answers || []).map(studyFromDicom));
}

async function searchByUpload(file) {
  state.mode = "upload";
  state.file = file;
  remember();
  message(`Searching with ${file.name}…`);
  const f = filters();
  const q = new URLSearchParams({ k: f.k });
  if (f.modality) q.set("modality", f.modality);
  if (f.dateFrom) q.set("date_from", f.dateFrom);
  if (f.dateTo) q.set("date_to", f.dateTo);
  if ($("kind").value) q.set("route", $("kind").value);
  if (f.patients === "other") q.set("exclude_same_patient", "yes");
  if (f.patients === "same") {
    if (!state.uploadPatient) return fail(new Error("This file names no patient: 'same patient' needs a DICOM file."));
    q.set("patient_id", state.uploadPatient);
  }
  const form = new FormData();
  form.append("file", file, file.name);
  let body;
  try {
    body = await api("/api/similar/upload?" + q, { method: "POST", body: form });
  } catch (err) {
    return fail(err);
  }
  state.uploadPatient = body.reference.patient_id || "";
  showUploadReference(file, body.reference, body.route);
  showResults(body.results.map(studyFromJson));
}

// The model that answered, in words; and, for a picture the general model read while others
// exist, where to say what it shows.
function describeRoute(name, dicom) {
  const route = state.config.routes.find((r) => r.name === name);
  const text = `Read by the model for ${route ? route.serves : name}`;
  const others = state.config.routes.some((r) => !r.general);
  if (route && route.general && !dicom && others && !$("kind").value) {
    return `${text}. A picture says nothing of its kind: choose the kind of image for a specialised model.`;
  }
  return text;
}

function fail(err) {
  message(err.message, true);
  $("results-section").hidden = true;
  $("reference-section").hidden = true; // the previous search's reference would read as this one's
}

// -- drawing -----------------------------------------------------------------------------------
function metaList(study, isResult) {
  const meta = el("div", { class: "meta" });
  if (isResult) {
    const head = el("div", { class: "headline" });
    head.append(
      el("span", { class: "rank" }, `#${study.rank}`),
      el("span", { class: "score", title: "likeness 0-1 after re-ranking" },
        `score ${study.score === "" ? "?" : Number(study.score).toFixed(3)}`),
      el("span", { class: "distance", title: "bits that differ between the codes" }, `distance ${study.distance}`),
    );
    meta.append(head);
  }
  const images = study.images === "" || study.images === null || study.images === undefined ? "" : `${study.images} image(s)`;
  meta.append(
    el("div", { class: "line strong" }, [showDate(study.date), study.modalities, images].filter(Boolean).join(" · ")),
    el("div", { class: "line" }, study.description || ""),
    el("div", { class: "line muted" }, [study.patientName, study.patientId, study.accession].filter(Boolean).join(" · ")),
  );
  return meta;
}

function openImage(src, caption) {
  $("viewer-image").src = src;
  $("viewer-image").alt = caption;
  $("viewer-caption").textContent = caption;
  $("viewer").showModal();
}

async function fillThumbnails(container, study, label) {
  let instances;
  try {
    instances = await api(`/dicom-web/studies/${study.uid}/instances`, { headers: { Accept: "application/dicom+json" } });
  } catch (err) {
    container.append(el("span", { class: "more" }, `no images: ${err.message}`));
    return;
  }
  instances.slice(0, THUMBS_PER_ROW).forEach((ds, n) => {
    const series = value(ds, "0020000E");
    const sop = value(ds, "00080018");
    const caption = `${label}, image ${n + 1} of ${instances.length}`;
    const button = el("button", { type: "button", title: caption });
    const img = el("img", { src: thumbUrl(study.uid, series, sop), alt: caption, loading: "lazy", class: "thumb" });
    button.append(img);
    const rendered = `/dicom-web/studies/${study.uid}/series/${series}/instances/${sop}/rendered?viewport=2048,2048`;
    button.addEventListener("click", () => openImage(rendered, caption));
    container.append(button);
  });
  if (instances.length > THUMBS_PER_ROW) container.append(el("span", { class: "more" }, `+${instances.length - THUMBS_PER_ROW}`));
}

function viewerLinks(study) {
  const fields = { StudyInstanceUID: study.uid, AccessionNumber: study.accession, PatientID: study.patientId, StudyDate: study.date };
  return state.config.viewers.map((v) => {
    const href = v.url.replace(/\{(\w+)\}/g, (_, name) => encodeURIComponent(fields[name] || ""));
    return el("a", { href, target: "_blank", rel: "noopener noreferrer", class: "viewer-link" }, `Open in ${v.name}`);
  });
}

function sendButtons(study) {
  return state.config.move_destinations.map((ae) => {
    const button = el("button", { type: "button", class: "send" }, `Send to ${ae}`);
    button.addEventListener("click", async () => {
      const note = button.nextElementSibling && button.nextElementSibling.classList.contains("sent")
        ? button.nextElementSibling : el("span", { class: "sent", role: "status" });
      button.after(note);
      note.classList.remove("error");
      note.textContent = "sending…";
      button.disabled = true;
      try {
        const r = await api(`/api/studies/${study.uid}/move`, {
          method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ destination: ae }),
        });
        note.textContent = `sent ${r.completed} image(s)` + (r.failed ? `, ${r.failed} failed` : "");
      } catch (err) {
        note.textContent = err.message;
        note.classList.add("error");
      } finally {
        button.disabled = false;
      }
    });
    return button;
  });
}

function showReferenceStudy(study) {
  const row = $("reference");
  row.replaceChildren();
  const thumbs = el("div", { class: "thumbs" });
  row.append(metaList(study, false), thumbs, el("div", { class: "actions" }));
  row.lastChild.append(...viewerLinks(study));
  $("reference-section").hidden = false;
  fillThumbnails(thumbs, study, "Reference");
}

function showUploadReference(file, reference, route) {
  const row = $("reference");
  row.replaceChildren();
  const dl = el("div", { class: "meta" });
  dl.append(el("div", { class: "line strong" }, file.name));
  if (reference.patient_id) dl.append(el("div", { class: "line muted" }, `Patient ${reference.patient_id}`));
  dl.append(el("div", { class: "line", id: "answered-by" }, describeRoute(route, Boolean(reference.study_instance_uid))));
  const thumbs = el("div", { class: "thumbs" });
  const caption = `Uploaded image ${file.name}, as the model saw it`;
  const button = el("button", { type: "button", title: caption });
  button.append(el("img", { src: reference.thumbnail, alt: caption, class: "thumb" }));
  button.addEventListener("click", () => openImage(reference.thumbnail, caption));
  thumbs.append(button);
  row.append(dl, thumbs, el("div", { class: "actions" }));
  $("reference-section").hidden = false;
}

function showResults(studies) {
  const list = $("results");
  list.replaceChildren();
  for (const study of studies) {
    const label = `Result ${study.rank}, ${showDate(study.date)}`;
    const li = el("li", { class: "row result", tabindex: "0", "data-study": study.uid, "aria-label": label });
    const thumbs = el("div", { class: "thumbs" });
    const actions = el("div", { class: "actions" });
    actions.append(...viewerLinks(study), ...sendButtons(study));
    li.append(metaList(study, true), thumbs, actions);
    list.append(li);
    fillThumbnails(thumbs, study, label);
  }
  $("count").textContent = `(${studies.length})`;
  $("results-section").hidden = false;
  message(studies.length ? `${studies.length} similar ${studies.length === 1 ? "study" : "studies"}, nearest first.`
    : "No study matches these filters.");
}

// -- keyboard and drop -------------------------------------------------------------------------
function onKey(event) {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
  if (event.key === "/" && !typing) {
    event.preventDefault();
    $("ref").focus();
    $("ref").select();
    return;
  }
  const row = document.activeElement.closest && document.activeElement.closest("li.result");
  if (typing) return;
  const rows = [...document.querySelectorAll("li.result")];
  if (!rows.length) return;
  if (["ArrowDown", "j", "ArrowUp", "k"].includes(event.key)) {
    event.preventDefault();
    const step = event.key === "ArrowDown" || event.key === "j" ? 1 : -1;
    const at = row ? rows.indexOf(row) : -1;
    rows[Math.max(0, Math.min(rows.length - 1, at + step))].focus();
  } else if (event.key === "Enter" && row && document.activeElement === row) {
    const link = row.querySelector("a.viewer-link") || row.querySelector(".thumbs button");
    if (link) link.click();
  }
}

function setUpDrop() {
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((type) =>
    document.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((type) =>
    document.addEventListener(type, (e) => { e.preventDefault(); if (type === "drop" || e.target === document.documentElement) drop.classList.remove("over"); }));
  document.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) { state.uploadPatient = ""; searchByUpload(file); }
  });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) { state.uploadPatient = ""; searchByUpload(file); }
  });
}

async function start() {
  try {
    state.config = await api("/api/page");
  } catch (err) {
    return message(err.message, true);
  }
  $("who").textContent = state.config.kind === "user" ? `Logged in as ${state.config.user}` : "Logged in with the API token";
  for (const route of state.config.routes) $("kind").append(el("option", { value: route.name }, route.serves));
  $("kind").addEventListener("change", () => { if (state.mode === "upload" && state.file) searchByUpload(state.file); });
  $("ref-kind").addEventListener("change", syncReferenceKind);
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    // A filter changed after an upload searches with the same file again.
    if (state.mode === "upload" && state.file && !$("ref").value.trim()) searchByUpload(state.file);
    else searchByReference();
  });
  document.addEventListener("keydown", onKey);
  setUpDrop();
  if (restore()) searchByReference();
  else $("ref").focus();
}

document.addEventListener("DOMContentLoaded", start);
