/* The study page's slice viewer: raw slices from the JSON API drawn on a canvas, window/level by drag,
   slices by wheel or slider, DWI/ADC/FLAIR switch, lesion overlay on/off with opacity, the patient-direction
   letters (computed by the server) on the four edges. No libraries. */
(function () {
  "use strict";
  const root = document.getElementById("viewer");
  if (!root) { return; }
  const api = root.dataset.api;
  const canvas = document.getElementById("canvas");
  const context = canvas.getContext("2d");
  const slider = document.getElementById("slice");
  const overlayToggle = document.getElementById("overlay-toggle");
  const opacity = document.getElementById("overlay-opacity");
  const message = document.getElementById("viewer-message");
  const cache = new Map();
  const state = { volumes: {}, role: null, index: 0, center: 0, width: 1 };

  function fetchRaw(url, Type) {
    if (cache.has(url)) { return Promise.resolve(cache.get(url)); }
    return fetch(url, { credentials: "same-origin" }).then(function (response) {
      if (!response.ok) { throw new Error(url + ": HTTP " + response.status); }
      return response.arrayBuffer();
    }).then(function (buffer) {
      const values = new Type(buffer);
      if (cache.size > 400) { cache.clear(); }
      cache.set(url, values);
      return values;
    });
  }

  function draw() {
    const meta = state.volumes[state.role];
    if (!meta) { return; }
    const role = state.role, index = state.index;
    const wantOverlay = meta.overlay && overlayToggle.checked;
    const requests = [fetchRaw(api + "/volumes/" + role + "/" + index, Float32Array)];
    if (wantOverlay) { requests.push(fetchRaw(api + "/overlay/" + role + "/" + index, Uint8Array)); }
    Promise.all(requests).then(function (arrays) {
      if (role !== state.role || index !== state.index) { return; }
      const pixels = arrays[0], mask = arrays[1];
      const image = context.createImageData(meta.columns, meta.rows);
      const low = state.center - state.width / 2, scale = 255 / state.width;
      const alpha = Number(opacity.value) / 100;
      for (let i = 0; i < pixels.length; i += 1) {
        let grey = Math.min(255, Math.max(0, (pixels[i] - low) * scale));
        let red = grey, green = grey, blue = grey;
        if (mask && mask[i]) {
          red = grey * (1 - alpha) + 255 * alpha;
          green = grey * (1 - alpha);
          blue = grey * (1 - alpha);
        }
        const o = i * 4;
        image.data[o] = red; image.data[o + 1] = green; image.data[o + 2] = blue; image.data[o + 3] = 255;
      }
      context.putImageData(image, 0, 0);
      canvas.dataset.rendered = [role, index, mask ? "overlay" : "plain", opacity.value,
        Math.round(state.center), Math.round(state.width)].join(":");
      document.getElementById("slice-label").textContent = (index + 1) + " / " + meta.slices;
      document.getElementById("window-label").textContent =
        "W " + Math.round(state.width) + " L " + Math.round(state.center);
    }).catch(function (error) { message.textContent = String(error); });
  }

  function selectRole(role) {
    const meta = state.volumes[role];
    state.role = role;
    canvas.width = meta.columns;
    canvas.height = meta.rows;
    state.center = meta.window_center;
    state.width = meta.window_width;
    slider.max = String(meta.slices - 1);
    state.index = Math.min(meta.best_slice, meta.slices - 1);
    slider.value = String(state.index);
    Object.keys(meta.edge_letters).forEach(function (edge) {
      document.getElementById("edge-" + edge).textContent = meta.edge_letters[edge];
    });
    document.querySelectorAll("#roles button").forEach(function (button) {
      button.classList.toggle("active", button.dataset.role === role);
    });
    draw();
  }

  function setSlice(index) {
    const meta = state.volumes[state.role];
    state.index = Math.max(0, Math.min(meta.slices - 1, index));
    slider.value = String(state.index);
    draw();
  }

  canvas.addEventListener("wheel", function (event) {
    event.preventDefault();
    setSlice(state.index + (event.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  slider.addEventListener("input", function () { setSlice(Number(slider.value)); });
  overlayToggle.addEventListener("change", draw);
  opacity.addEventListener("input", draw);

  let drag = null;
  canvas.addEventListener("mousedown", function (event) {
    drag = { x: event.clientX, y: event.clientY, center: state.center, width: state.width };
  });
  window.addEventListener("mouseup", function () { drag = null; });
  window.addEventListener("mousemove", function (event) {
    if (!drag) { return; }
    const step = drag.width / 200;
    state.width = Math.max(1e-3, drag.width + (event.clientX - drag.x) * step);
    state.center = drag.center - (event.clientY - drag.y) * step;
    draw();
  });

  fetch(api + "/volumes", { credentials: "same-origin" }).then(function (response) {
    if (!response.ok) { throw new Error("volumes: HTTP " + response.status); }
    return response.json();
  }).then(function (body) {
    state.volumes = body.volumes;
    const roles = ["dwi", "adc", "flair"].filter(function (role) { return role in body.volumes; });
    const holder = document.getElementById("roles");
    roles.forEach(function (role) {
      const button = document.createElement("button");
      button.type = "button";
      button.id = "role-" + role;
      button.dataset.role = role;
      button.textContent = role.toUpperCase();
      button.addEventListener("click", function () { selectRole(role); });
      holder.appendChild(button);
    });
    if (roles.length) { selectRole(roles[0]); } else { message.textContent = "No source images (not processed, or the spool was purged)."; }
  }).catch(function (error) { message.textContent = String(error); });
}());
