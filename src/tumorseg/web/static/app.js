// Upload the chosen slice to POST /predict and show the answer; no external scripts.
"use strict";
const $ = (id) => document.getElementById(id);
const png = (b64) => "data:image/png;base64," + b64;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function loadHealth() {
  try {
    const r = await fetch("health");
    if (!r.ok) return;
    const h = await r.json();
    $("model-info").textContent = `Model ${h.model} (${h.backend}, ${h.input_size}×${h.input_size}), tumorseg ${h.version}.`;
    if (h.sequences && h.sequences.length) showSequenceInputs(h.sequences);
  } catch (e) { /* the page still works without it */ }
}

// A multi-sequence model takes one image per sequence: one file input each, analysed once all are chosen.
function showSequenceInputs(sequences) {
  $("file").hidden = true;
  document.querySelector('label[for="file"]').textContent = `One image per MRI sequence (${sequences.join(", ")}) of the same slice`;
  const holder = $("sequence-inputs");
  for (const name of sequences) {
    const label = document.createElement("label");
    label.textContent = name + " ";
    const input = document.createElement("input");
    input.type = "file";
    input.id = "file-" + name;
    input.name = name;
    input.accept = $("file").accept;
    input.addEventListener("change", () => {
      const chosen = sequences.map((s) => $("file-" + s).files[0]);
      if (chosen.every(Boolean)) upload(chosen[0], sequences.map((s, i) => [s, chosen[i]]));
    });
    label.appendChild(input);
    holder.appendChild(label);
  }
  holder.hidden = false;
}

// Only the answer to the latest upload is shown: an older request that finishes later is ignored.
let latest = 0;

async function upload(file, parts = [["file", file]]) {
  const ticket = ++latest;
  $("error").hidden = true;
  $("result").hidden = true;
  $("status").textContent = `Analysing ${file.name} …`;
  const body = new FormData();
  for (const [field, part] of parts) body.append(field, part, part.name);
  let r;
  try {
    r = await fetch("predict", { method: "POST", body });
  } catch (e) {
    if (ticket !== latest) return;
    $("status").textContent = "";
    showError("Could not reach the server: " + e);
    return;
  }
  let answer = null;
  try { answer = await r.json(); } catch (e) { /* not JSON */ }
  if (ticket !== latest) return;
  $("status").textContent = "";
  if (!r.ok) {
    showError(`Error ${r.status}: ` + (answer && answer.detail ? answer.detail : r.statusText));
    return;
  }
  $("overlay").src = png(answer.overlay_png);
  if (answer.gradcam_png) {
    $("gradcam").src = png(answer.gradcam_png);
    $("gradcam-layer").textContent = "layer " + answer.gradcam_layer;
  } else {
    $("gradcam").removeAttribute("src");
    $("gradcam-layer").textContent = "not available for this model";
  }
  $("present").textContent = answer.tumour_present ? "found" : "none found";
  $("area").textContent = `${answer.area_px.toLocaleString("en")} px (${answer.area_pct.toFixed(2)} % of the image)`;
  $("confidence").textContent = answer.tumour_present ? answer.mean_confidence.toFixed(3) : "–";
  $("size").textContent = `${answer.width} × ${answer.height} px, ${answer.elapsed_ms.toFixed(0)} ms`;
  const link = $("download-mask");
  link.href = png(answer.mask_png);
  link.download = answer.filename.replace(/\.[^.]*$/, "") + "_mask.png";
  $("result").hidden = false;
  $("status").textContent = `Done: ${answer.filename}`;
}

$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) upload(file);
  event.target.value = "";  // choosing the same file again analyses it again
});
loadHealth();
