// edge-shitu kiosk UI: plain ES2020, no framework, no build step, no external resources.
// Talks to the HTTP API of docs/kiosk.md; every /api request carries the token when one is known.
'use strict';
(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = 'edge-shitu-token';
  const LIVE_MAX_SIDE = 640;   // frames sent by the live loop
  const STILL_MAX_SIDE = 1280; // frozen frames and photos
  const PAGE = 100;            // gallery page size

  const state = {
    token: null,
    tokenWanted: false,
    info: null,
    settings: null,
    page: 'live',
    stream: null,
    paused: false,
    live: null,        // {response, w, h}: the last live recognition and the size of the frame it saw
    last: null,        // the last recognition response from any source (settings preview)
    enrol: { frozen: null, blob: null, results: [], selected: null, drawing: null, lastId: null },
    gallery: { items: [], labels: [], total: 0, urls: new Map(), stale: true, loading: false },
    calib: null,
  };

  // ------------------------------------------------------------------ status line

  function setStatus(text, kind = '') {
    const el = $('status');
    el.textContent = text;
    el.className = kind;
    el.title = text;
  }

  function showError(err) {
    const msg = err && err.message ? err.message : String(err);
    console.error(err);
    setStatus(msg, 'error');
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // ------------------------------------------------------------------ token and API

  function readToken() {
    const m = /(?:^#|&)token=([^&]*)/.exec(location.hash || '');
    if (m) {
      const t = decodeURIComponent(m[1]).trim();
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      history.replaceState(null, '', location.pathname + location.search);
    }
    state.token = sessionStorage.getItem(TOKEN_KEY);
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, opts = {}) {
    const headers = {};
    if (state.token) headers.Authorization = 'Bearer ' + state.token;
    let body;
    if (opts.json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.json);
    } else if (opts.body) {
      headers['Content-Type'] = opts.body.type || 'image/jpeg';
      body = opts.body;
    }
    const shown = path.split('?')[0];
    let res;
    try {
      res = await fetch(path, { method, headers, body, cache: 'no-store', credentials: 'same-origin' });
    } catch (e) {
      throw new ApiError(0, `${method} ${shown}: the service does not answer (${e.message})`);
    }
    if (res.status === 401 || res.status === 403) askToken(res.status);
    if (!res.ok) {
      let msg = res.statusText || 'failed';
      try {
        const j = await res.json();
        if (j && j.error) msg = j.error;
      } catch (_) { /* not JSON: keep the status text */ }
      throw new ApiError(res.status, `${method} ${shown}: ${res.status} ${msg}`);
    }
    if (opts.blob) return res.blob();
    return res.json();
  }

  function askToken(status) {
    if (state.tokenWanted) return;
    state.tokenWanted = true;
    const dlg = $('token-dialog');
    dlg.querySelector('p').textContent = status === 401
      ? 'This service needs its access token (the file given by --token-file on the device).'
      : 'The token was refused: enter the right one.';
    $('token-input').value = '';
    dlg.hidden = false;
    $('token-input').focus();
  }

  function tokenDone(save) {
    if (save) {
      const t = $('token-input').value.trim();
      if (!t) return;
      sessionStorage.setItem(TOKEN_KEY, t);
      state.token = t;
    } else {
      state.paused = true;
      $('live-pause').textContent = 'Resume';
    }
    $('token-dialog').hidden = true;
    state.tokenWanted = false;
    if (save) {
      setStatus('Token set', 'ok');
      loadInfo();
      showPage(state.page);
    }
  }

  // ------------------------------------------------------------------ dialogs

  function confirmDialog(text, yesText = 'Delete') {
    return new Promise((resolve) => {
      const dlg = $('confirm');
      $('confirm-text').textContent = text;
      $('confirm-yes').textContent = yesText;
      dlg.hidden = false;
      const done = (v) => {
        dlg.hidden = true;
        $('confirm-yes').onclick = null;
        $('confirm-no').onclick = null;
        resolve(v);
      };
      $('confirm-yes').onclick = () => done(true);
      $('confirm-no').onclick = () => done(false);
    });
  }

  function promptDialog(text, value) {
    return new Promise((resolve) => {
      const dlg = $('prompt');
      const input = $('prompt-input');
      $('prompt-text').textContent = text;
      input.value = value || '';
      dlg.hidden = false;
      input.focus();
      input.select();
      const done = (v) => {
        dlg.hidden = true;
        $('prompt-ok').onclick = $('prompt-cancel').onclick = input.onkeydown = null;
        resolve(v);
      };
      $('prompt-ok').onclick = () => done(input.value.trim() || null);
      $('prompt-cancel').onclick = () => done(null);
      input.onkeydown = (e) => {
        if (e.key === 'Enter') done(input.value.trim() || null);
        if (e.key === 'Escape') done(null);
      };
    });
  }

  // ------------------------------------------------------------------ images and drawing

  function scaledCanvas(src, w, h, maxSide) {
    const s = Math.min(1, maxSide / Math.max(w, h));
    const c = document.createElement('canvas');
    c.width = Math.max(1, Math.round(w * s));
    c.height = Math.max(1, Math.round(h * s));
    c.getContext('2d').drawImage(src, 0, 0, c.width, c.height);
    return c;
  }

  function toJpeg(canvas, quality) {
    return new Promise((resolve, reject) => {
      canvas.toBlob((b) => (b ? resolve(b) : reject(new Error('could not encode the image as JPEG'))),
        'image/jpeg', quality);
    });
  }

  async function decodeFile(file) {
    if (window.createImageBitmap) {
      try {
        return await createImageBitmap(file);
      } catch (_) { /* fall back to <img> */ }
    }
    const url = URL.createObjectURL(file);
    try {
      const img = new Image();
      img.src = url;
      await img.decode();
      return img;
    } catch (e) {
      throw new Error(`${file.name}: not an image this browser can decode`);
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  // Fit a canvas's backing store to its displayed size; returns the 2D context and the CSS size.
  function fitCanvas(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth, h = canvas.clientHeight;
    const bw = Math.max(1, Math.round(w * dpr)), bh = Math.max(1, Math.round(h * dpr));
    if (canvas.width !== bw || canvas.height !== bh) {
      canvas.width = bw;
      canvas.height = bh;
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    return { ctx, w, h };
  }

  // Where an image of (iw, ih) lands in a (cw, ch) box with object-fit: contain.
  function contain(iw, ih, cw, ch) {
    const s = Math.min(cw / iw, ch / ih);
    return { s, x: (cw - iw * s) / 2, y: (ch - ih * s) / 2, w: iw * s, h: ih * s };
  }

  // The gallery's acceptance rule: the best match within a radius of Hamming distance, or (a gallery that keeps
  // compact features) a re-ranked similarity of at least a threshold.
  function simMode() {
    const s = state.settings || (state.info && state.info.gallery);
    return !!(s && s.mode === 'similarity');
  }

  function closeness(c) {
    if (simMode()) return typeof c.similarity === 'number' ? c.similarity.toFixed(3) : '';
    return c.distance !== undefined && c.distance !== null ? String(c.distance) : '';
  }

  function resultText(r) {
    if (r.label === null || r.label === undefined) return '?';
    const c = closeness(r);
    return c ? `${r.label} ${c}` : String(r.label);
  }

  // Boxes are in the coordinates of an image of width iw; `fit` maps that image onto the canvas.
  function drawBoxes(ctx, results, fit, opts = {}) {
    const font = opts.font || 16;
    ctx.font = `${font}px system-ui, "Noto Sans CJK SC", "Microsoft YaHei", sans-serif`;
    ctx.textBaseline = 'top';
    // Unknown boxes first, recognised ones over them, the selected one on top.
    const known = (r) => r.label !== null && r.label !== undefined;
    const rank = (r, i) => (opts.selected === i ? 2 : known(r) ? 1 : 0);
    const order = (results || []).map((r, i) => i).sort((a, b) => rank(results[a], a) - rank(results[b], b) || b - a);
    order.forEach((i) => {
      const r = results[i];
      if (!r.box) return;
      const [x1, y1, x2, y2] = r.box;
      const x = fit.x + x1 * fit.s, y = fit.y + y1 * fit.s, w = (x2 - x1) * fit.s, h = (y2 - y1) * fit.s;
      const isKnown = known(r);
      const selected = opts.selected === i;
      ctx.lineWidth = selected ? 4 : 3;
      ctx.strokeStyle = selected ? '#facc15' : isKnown ? '#3ddc84' : '#9aa4ad';
      ctx.setLineDash(isKnown || selected ? [] : [7, 5]);
      ctx.strokeRect(x, y, w, h);
      ctx.setLineDash([]);
      const text = (opts.numbered ? `${i + 1} ` : '') + (isKnown ? resultText(r) : '? unknown');
      const tw = ctx.measureText(text).width + 8;
      const ty = y - font - 6 >= 0 ? y - font - 6 : y;
      ctx.fillStyle = selected ? '#facc15' : isKnown ? '#3ddc84' : 'rgba(60,64,70,.85)';
      ctx.fillRect(x - 1.5, ty, tw, font + 6);
      ctx.fillStyle = isKnown || selected ? '#06210f' : '#e8eaed';
      ctx.fillText(text, x + 3, ty + 3);
    });
  }

  function renderResultList(ul, results) {
    ul.textContent = '';
    (results || []).forEach((r) => {
      const li = document.createElement('li');
      const known = r.label !== null && r.label !== undefined;
      li.className = known ? 'result' : 'result unknown';
      li.dataset.label = known ? r.label : '';
      const name = document.createElement('span');
      name.textContent = known ? r.label : 'unknown';
      const d = document.createElement('span');
      d.className = 'd';
      const best = r.candidates && r.candidates.length ? r.candidates[0] : null;
      const unit = simMode() ? `similarity ${closeness(r)}` : `${r.distance} bits`;
      d.textContent = known ? unit : best ? `best ${best.label} ${closeness(best)}` : '';
      li.append(name, d);
      ul.append(li);
    });
  }

  // ------------------------------------------------------------------ info, labels

  async function loadInfo() {
    try {
      state.info = await api('GET', '/api/info');
      const replica = !!(state.info.bundle && state.info.bundle.replica);
      $('replica').hidden = !replica;
      const bits = state.info.bundle && state.info.bundle.bits;
      if (bits) $('settings-radius').max = bits;
      layoutChanged();
      refreshLabels();
    } catch (e) {
      showError(e);
    }
  }

  async function refreshLabels() {
    try {
      const j = await api('GET', '/api/labels');
      state.gallery.labels = j.labels || [];
      const dl = $('label-list');
      dl.textContent = '';
      for (const l of state.gallery.labels) {
        const o = document.createElement('option');
        o.value = l.label;
        dl.append(o);
      }
    } catch (e) {
      showError(e);
    }
  }

  // ------------------------------------------------------------------ tabs

  function showPage(name) {
    state.page = name;
    document.querySelectorAll('.page').forEach((p) => { p.hidden = p.dataset.page !== name; });
    document.querySelectorAll('.tab').forEach((t) => {
      t.classList.toggle('active', t.dataset.page === name);
      t.setAttribute('aria-selected', t.dataset.page === name ? 'true' : 'false');
    });
    if (name === 'gallery') loadGallery();
    if (name === 'settings') loadSettings();
    if (name === 'live') drawLive();
    if (name === 'enrol') drawEnrol();
  }

  function layoutChanged() {
    requestAnimationFrame(() => {
      drawLive();
      drawEnrol();
    });
  }

  // ------------------------------------------------------------------ camera and live loop

  function noCamera(text) {
    for (const id of ['live-nocamera', 'enrol-nocamera']) {
      const el = $(id);
      el.textContent = '';
      const p = document.createElement('div');
      p.textContent = text + ' Use the Photos tab to recognise image files.';
      const b = document.createElement('button');
      b.className = 'btn primary';
      b.textContent = 'Open Photos';
      b.style.marginTop = '10px';
      b.onclick = () => showPage('photos');
      const wrap = document.createElement('div');
      wrap.append(p, b);
      el.append(wrap);
      el.hidden = false;
    }
    $('live-fps').textContent = 'no camera';
    $('enrol-freeze').disabled = true;
  }

  async function startCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      noCamera(window.isSecureContext
        ? 'No camera: this browser gives no camera access.'
        : 'No camera: browsers allow the camera only on https or on the device itself (http://localhost).');
      return;
    }
    try {
      state.stream = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 1280 }, height: { ideal: 720 }, facingMode: 'environment' }, audio: false,
      });
    } catch (e) {
      noCamera(`No camera (${e.name}${e.message ? ': ' + e.message : ''}).`);
      return;
    }
    for (const id of ['live-video', 'enrol-video']) {
      const v = $(id);
      v.srcObject = state.stream;
      v.play().catch(() => {});
    }
    liveLoop();
  }

  async function liveLoop() {
    const v = $('live-video');
    const done = [];
    let failing = false;
    let canvas = null;
    for (;;) {
      if (state.page !== 'live' || state.paused || state.tokenWanted || document.hidden || v.readyState < 2
          || !v.videoWidth) {
        await sleep(120);
        continue;
      }
      const s = Math.min(1, LIVE_MAX_SIDE / Math.max(v.videoWidth, v.videoHeight));
      const w = Math.round(v.videoWidth * s), h = Math.round(v.videoHeight * s);
      if (!canvas || canvas.width !== w || canvas.height !== h) {
        canvas = document.createElement('canvas');
        canvas.width = w;
        canvas.height = h;
      }
      canvas.getContext('2d').drawImage(v, 0, 0, w, h);
      let r, t0;
      try {
        const blob = await toJpeg(canvas, 0.8);
        t0 = performance.now();
        r = await api('POST', '/api/recognize', { body: blob });
      } catch (e) {
        failing = true;
        showError(e);
        await sleep(1000);
        continue;
      }
      const t1 = performance.now();
      if (failing) {
        failing = false;
        setStatus('Live recognition running again', 'ok');
      }
      done.push(t1);
      while (done.length > 10) done.shift();
      const fps = done.length > 1 ? ((done.length - 1) * 1000) / (done[done.length - 1] - done[0]) : 0;
      state.live = { response: r, w, h };
      state.last = r;
      drawLive();
      renderResultList($('live-results'), r.results);
      $('live-fps').textContent = `${fps.toFixed(1)} fps`;
      const tm = r.timings_ms || {};
      const server = tm.total !== undefined ? tm.total
        : Object.values(tm).reduce((a, b) => a + (typeof b === 'number' ? b : 0), 0);
      $('live-latency').textContent = `${Math.round(t1 - t0)} ms (server ${Math.round(server)})`;
      $('live-latency').title = Object.entries(tm).map(([k, x]) => `${k}: ${x} ms`).join(', ');
      if (r.replica) $('replica').hidden = false;
    }
  }

  function drawLive() {
    const c = $('live-canvas');
    if (c.offsetParent === null) return;
    const { ctx, w, h } = fitCanvas(c);
    const v = $('live-video');
    if (!state.live || !v.videoWidth) return;
    // The frame (live.w x live.h) is the video scaled: place it like the <video> (object-fit: contain).
    const fit = contain(state.live.w, state.live.h, w, h);
    const r = state.live.response;
    const sx = r.width && r.width !== state.live.w ? state.live.w / r.width : 1;
    drawBoxes(ctx, r.results, { x: fit.x, y: fit.y, s: fit.s * sx });
  }

  // ------------------------------------------------------------------ enrol

  async function freeze() {
    const v = $('enrol-video');
    if (!v.videoWidth) {
      setStatus('The camera has no picture yet', 'error');
      return;
    }
    const c = scaledCanvas(v, v.videoWidth, v.videoHeight, STILL_MAX_SIDE);
    try {
      const blob = await toJpeg(c, 0.9);
      setFrozen(c, blob, null);
    } catch (e) {
      showError(e);
    }
  }

  // Show a still (canvas + its JPEG) in the Enrol tab; recognise it when no results are given.
  async function setFrozen(canvas, blob, results) {
    const en = state.enrol;
    en.frozen = canvas;
    en.blob = blob;
    en.results = results || [];
    en.selected = null;
    en.drawn = null;
    $('enrol-video').hidden = true;
    $('enrol-canvas').hidden = false;
    $('enrol-nocamera').hidden = true;
    $('enrol-unfreeze').hidden = false;
    $('enrol-save').disabled = false;
    $('enrol-status').textContent = '';
    renderChoices();
    drawEnrol();
    if (!results) {
      $('enrol-status').textContent = 'Looking for objects...';
      try {
        const r = await api('POST', '/api/recognize', { body: blob });
        if (en.blob !== blob) return; // another still replaced this one meanwhile
        en.scale = r.width && r.width !== canvas.width ? canvas.width / r.width : 1;
        en.results = r.results || [];
        state.last = r;
        $('enrol-status').textContent = en.results.length
          ? `${en.results.length} object(s): tap one or drag to draw a box`
          : 'No object found: drag to draw a box, or save the whole image';
      } catch (e) {
        $('enrol-status').textContent = '';
        showError(e);
      }
    } else {
      en.scale = 1;
    }
    if (en.selected === null && !en.drawn && en.results.length) en.selected = 0;
    renderChoices();
    drawEnrol();
  }

  function unfreeze() {
    const en = state.enrol;
    en.frozen = en.blob = null;
    en.results = [];
    en.selected = null;
    en.drawn = null;
    $('enrol-canvas').hidden = true;
    $('enrol-video').hidden = false;
    $('enrol-unfreeze').hidden = true;
    $('enrol-save').disabled = true;
    if (!state.stream) $('enrol-nocamera').hidden = false;
    renderChoices();
  }

  function renderChoices() {
    const en = state.enrol;
    const box = $('enrol-boxes');
    box.textContent = '';
    if (!en.frozen) return;
    const add = (text, active, onclick) => {
      const b = document.createElement('button');
      b.className = 'choice' + (active ? ' selected' : '');
      b.textContent = text;
      b.onclick = onclick;
      box.append(b);
      return b;
    };
    en.results.forEach((r, i) => {
      const b = add(`${i + 1} ${r.label === null || r.label === undefined ? '?' : r.label}`,
        en.selected === i && !en.drawn, () => { en.selected = i; en.drawn = null; renderChoices(); drawEnrol(); });
      b.dataset.index = String(i);
      b.id = `enrol-box-${i}`;
    });
    if (en.drawn) add('drawn box', true, () => {}).id = 'enrol-box-drawn';
    add('whole image', en.selected === 'whole' && !en.drawn,
      () => { en.selected = 'whole'; en.drawn = null; renderChoices(); drawEnrol(); }).id = 'enrol-box-whole';
  }

  function enrolBox() {
    // The chosen box in the frozen image's pixels, or null for the whole image.
    const en = state.enrol;
    if (en.drawn) return en.drawn;
    if (typeof en.selected === 'number' && en.results[en.selected]) {
      return en.results[en.selected].box.map((x) => x * (en.scale || 1));
    }
    return null;
  }

  function enrolFit() {
    const c = $('enrol-canvas');
    const f = state.enrol.frozen;
    return contain(f.width, f.height, c.clientWidth, c.clientHeight);
  }

  function drawEnrol() {
    const c = $('enrol-canvas');
    const en = state.enrol;
    if (!en.frozen || c.offsetParent === null) return;
    const { ctx } = fitCanvas(c);
    const fit = enrolFit();
    ctx.drawImage(en.frozen, fit.x, fit.y, fit.w, fit.h);
    const sel = en.drawn ? null : en.selected;
    drawBoxes(ctx, en.results, { x: fit.x, y: fit.y, s: fit.s * (en.scale || 1) },
      { selected: typeof sel === 'number' ? sel : null, numbered: true });
    const b = en.drawn || (en.selected === 'whole' ? [0, 0, en.frozen.width, en.frozen.height] : null);
    if (b) {
      ctx.lineWidth = 4;
      ctx.strokeStyle = '#facc15';
      ctx.strokeRect(fit.x + b[0] * fit.s, fit.y + b[1] * fit.s, (b[2] - b[0]) * fit.s, (b[3] - b[1]) * fit.s);
    }
  }

  function setupDrawing() {
    const c = $('enrol-canvas');
    let start = null;
    const toImage = (e) => {
      const rect = c.getBoundingClientRect();
      const fit = enrolFit();
      const f = state.enrol.frozen;
      const x = (e.clientX - rect.left - fit.x) / fit.s, y = (e.clientY - rect.top - fit.y) / fit.s;
      return [Math.min(Math.max(x, 0), f.width), Math.min(Math.max(y, 0), f.height)];
    };
    c.addEventListener('pointerdown', (e) => {
      if (!state.enrol.frozen) return;
      e.preventDefault();
      c.setPointerCapture(e.pointerId);
      start = toImage(e);
    });
    c.addEventListener('pointermove', (e) => {
      if (!start) return;
      const p = toImage(e);
      const en = state.enrol;
      const box = [Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.max(start[0], p[0]), Math.max(start[1], p[1])];
      if (box[2] - box[0] > 4 || box[3] - box[1] > 4 || en.drawn) {
        en.drawn = box;
        drawEnrol();
      }
    });
    const end = (e) => {
      if (!start) return;
      const p = toImage(e);
      const en = state.enrol;
      const s = start;
      start = null;
      const box = [Math.min(s[0], p[0]), Math.min(s[1], p[1]), Math.max(s[0], p[0]), Math.max(s[1], p[1])];
      const minSide = Math.max(8, Math.min(en.frozen.width, en.frozen.height) * 0.02);
      if (box[2] - box[0] >= minSide && box[3] - box[1] >= minSide) {
        en.drawn = box;
      } else {
        // A tap: choose the smallest detected box under the finger.
        en.drawn = null;
        let best = null, bestArea = Infinity;
        en.results.forEach((r, i) => {
          const k = en.scale || 1;
          const [x1, y1, x2, y2] = r.box.map((v) => v * k);
          const area = (x2 - x1) * (y2 - y1);
          if (p[0] >= x1 && p[0] <= x2 && p[1] >= y1 && p[1] <= y2 && area < bestArea) {
            best = i;
            bestArea = area;
          }
        });
        if (best !== null) en.selected = best;
      }
      renderChoices();
      drawEnrol();
    };
    c.addEventListener('pointerup', end);
    c.addEventListener('pointercancel', () => { start = null; });
  }

  async function saveEnrol() {
    const en = state.enrol;
    const label = $('enrol-label').value.trim();
    if (!en.blob) {
      setStatus('Freeze a frame (or send a photo here) first', 'error');
      return;
    }
    if (!label) {
      setStatus('Type a label first', 'error');
      $('enrol-label').focus();
      return;
    }
    const b = enrolBox();
    let q = `/api/items?label=${encodeURIComponent(label)}`;
    if (b) q += `&box=${b.map((x) => Math.round(x)).join(',')}`;
    else q += `&box=0,0,${en.frozen.width},${en.frozen.height}`;
    $('enrol-save').disabled = true;
    try {
      const r = await api('POST', q, { body: en.blob });
      en.lastId = r.id;
      $('enrol-undo').disabled = false;
      $('enrol-status').textContent = `Saved item #${r.id} as "${r.label}"` + (r.box ? ` (box ${r.box.map(Math.round).join(',')})` : '');
      setStatus(`Enrolled "${r.label}" (#${r.id})`, 'ok');
      state.gallery.stale = true;
      refreshLabels();
    } catch (e) {
      $('enrol-status').textContent = 'Not saved';
      showError(e);
    } finally {
      $('enrol-save').disabled = !en.blob;
    }
  }

  async function undoEnrol() {
    const en = state.enrol;
    if (en.lastId === null) return;
    const id = en.lastId;
    $('enrol-undo').disabled = true;
    try {
      await api('DELETE', `/api/items/${id}`);
      en.lastId = null;
      $('enrol-status').textContent = `Removed item #${id}`;
      setStatus(`Undone: item #${id} removed`, 'ok');
      state.gallery.stale = true;
      refreshLabels();
    } catch (e) {
      $('enrol-undo').disabled = false;
      showError(e);
    }
  }

  // ------------------------------------------------------------------ gallery

  const thumbQueue = [];
  let thumbsRunning = 0;

  function queueThumb(id, img) {
    thumbQueue.push([id, img]);
    pumpThumbs();
  }

  function pumpThumbs() {
    while (thumbsRunning < 3 && thumbQueue.length) {
      const [id, img] = thumbQueue.shift();
      thumbsRunning++;
      api('GET', `/api/items/${id}/thumbnail`, { blob: true })
        .then((blob) => {
          const url = URL.createObjectURL(blob);
          state.gallery.urls.set(id, url);
          img.src = url;
        })
        .catch((e) => {
          img.alt = 'no thumbnail';
          showError(e);
        })
        .finally(() => {
          thumbsRunning--;
          pumpThumbs();
        });
    }
  }

  async function loadGallery(force = false) {
    const g = state.gallery;
    if (g.loading || (!g.stale && !force)) {
      renderGallery();
      return;
    }
    g.loading = true;
    try {
      const [labels, page] = await Promise.all([
        api('GET', '/api/labels'),
        api('GET', `/api/items?offset=0&limit=${PAGE}`),
      ]);
      for (const url of g.urls.values()) URL.revokeObjectURL(url);
      g.urls.clear();
      thumbQueue.length = 0;
      g.labels = labels.labels || [];
      g.items = page.items || [];
      g.total = page.total || 0;
      g.stale = false;
      renderGallery();
    } catch (e) {
      showError(e);
    } finally {
      g.loading = false;
    }
  }

  async function loadMore(label) {
    const g = state.gallery;
    const have = label === undefined ? g.items.length : g.items.filter((it) => it.label === label).length;
    const q = label === undefined
      ? `/api/items?offset=${have}&limit=${PAGE}`
      : `/api/items?label=${encodeURIComponent(label)}&offset=${have}&limit=${PAGE}`;
    try {
      const page = await api('GET', q);
      const known = new Set(g.items.map((it) => it.id));
      for (const it of page.items || []) if (!known.has(it.id)) g.items.push(it);
      if (label === undefined) g.total = page.total;
      renderGallery();
    } catch (e) {
      showError(e);
    }
  }

  function renderGallery() {
    const g = state.gallery;
    const grid = $('gallery-grid');
    const filter = $('gallery-filter').value.trim().toLowerCase();
    grid.textContent = '';
    const byLabel = new Map();
    for (const it of g.items) {
      if (!byLabel.has(it.label)) byLabel.set(it.label, []);
      byLabel.get(it.label).push(it);
    }
    const labels = g.labels.map((l) => ({ label: l.label, count: l.count }));
    for (const l of byLabel.keys()) if (!labels.some((x) => x.label === l)) labels.push({ label: l, count: byLabel.get(l).length });
    let shownItems = 0, shownLabels = 0;
    for (const { label, count } of labels) {
      if (filter && !String(label).toLowerCase().includes(filter)) continue;
      shownLabels++;
      const items = byLabel.get(label) || [];
      const sec = document.createElement('section');
      sec.className = 'group';
      sec.dataset.label = label;
      const h = document.createElement('h3');
      const name = document.createElement('span');
      name.textContent = label;
      const cnt = document.createElement('span');
      cnt.className = 'count';
      cnt.textContent = `${count} item${count === 1 ? '' : 's'}`;
      h.append(name, cnt);
      if (items.length < count) {
        const more = document.createElement('button');
        more.className = 'btn small more';
        more.textContent = `show ${Math.min(PAGE, count - items.length)} more`;
        more.onclick = () => loadMore(label);
        h.append(more);
      }
      const del = document.createElement('button');
      del.className = 'btn small delete-label';
      del.textContent = 'Delete label';
      del.onclick = () => deleteLabel(label, count);
      h.append(del);
      sec.append(h);
      const wrap = document.createElement('div');
      wrap.className = 'items';
      for (const it of items) {
        wrap.append(itemElement(it));
        shownItems++;
      }
      sec.append(wrap);
      grid.append(sec);
    }
    if (!labels.length) {
      const p = document.createElement('p');
      p.className = 'small';
      p.textContent = 'The gallery is empty: enrol objects in the Enrol tab.';
      grid.append(p);
    }
    const totalLabels = g.labels.length;
    $('gallery-summary').textContent = filter
      ? `${shownLabels} of ${totalLabels} labels, ${shownItems} items shown`
      : `${g.total} item${g.total === 1 ? '' : 's'}, ${totalLabels} label${totalLabels === 1 ? '' : 's'}` + (g.items.length < g.total ? ` (${g.items.length} loaded)` : '');
    $('gallery-more').hidden = g.items.length >= g.total;
  }

  function itemElement(it) {
    const g = state.gallery;
    const el = document.createElement('div');
    el.className = 'item';
    el.dataset.id = String(it.id);
    el.dataset.label = it.label;
    if (it.has_thumbnail) {
      const img = document.createElement('img');
      img.alt = it.label;
      img.draggable = false;
      const url = g.urls.get(it.id);
      if (url) img.src = url;
      else queueThumb(it.id, img);
      el.append(img);
    } else {
      const ph = document.createElement('div');
      ph.className = 'placeholder';
      ph.textContent = 'no thumbnail';
      el.append(ph);
    }
    const meta = document.createElement('div');
    meta.className = 'meta';
    meta.textContent = `#${it.id}` + (it.source ? ` ${it.source}` : '');
    meta.title = `${it.label} #${it.id}` + (it.source ? `, ${it.source}` : '') + (it.added_at ? `, ${it.added_at}` : '');
    const row = document.createElement('div');
    row.className = 'row';
    const rel = document.createElement('button');
    rel.className = 'btn small relabel';
    rel.textContent = 'Label';
    rel.onclick = () => relabel(it);
    const del = document.createElement('button');
    del.className = 'btn small delete';
    del.textContent = 'Delete';
    del.onclick = () => deleteItem(it);
    row.append(rel, del);
    el.append(meta, row);
    return el;
  }

  async function relabel(it) {
    const label = await promptDialog(`New label for item #${it.id} (now "${it.label}")`, it.label);
    if (!label || label === it.label) return;
    try {
      const r = await api('PATCH', `/api/items/${it.id}`, { json: { label } });
      setStatus(`Item #${it.id} is now "${r.label}"`, 'ok');
      it.label = r.label;
      const labels = await api('GET', '/api/labels');
      state.gallery.labels = labels.labels || [];
      renderGallery();
      refreshLabels();
    } catch (e) {
      showError(e);
    }
  }

  async function deleteItem(it) {
    if (!(await confirmDialog(`Delete item #${it.id} ("${it.label}") from the gallery?`))) return;
    const g = state.gallery;
    try {
      await api('DELETE', `/api/items/${it.id}`);
      g.items = g.items.filter((x) => x.id !== it.id);
      g.total = Math.max(0, g.total - 1);
      const url = g.urls.get(it.id);
      if (url) URL.revokeObjectURL(url);
      g.urls.delete(it.id);
      if (state.enrol.lastId === it.id) {
        state.enrol.lastId = null;
        $('enrol-undo').disabled = true;
      }
      const labels = await api('GET', '/api/labels');
      g.labels = labels.labels || [];
      setStatus(`Deleted item #${it.id}`, 'ok');
      renderGallery();
      refreshLabels();
    } catch (e) {
      showError(e);
    }
  }

  async function deleteLabel(label, count) {
    if (!(await confirmDialog(`Delete the label "${label}" and all its ${count} item(s)?`))) return;
    try {
      const r = await api('DELETE', `/api/labels/${encodeURIComponent(label)}`);
      setStatus(`Deleted "${label}": ${r.deleted} item(s)`, 'ok');
      state.gallery.stale = true;
      await loadGallery(true);
      refreshLabels();
    } catch (e) {
      showError(e);
    }
  }

  // ------------------------------------------------------------------ settings and calibration

  async function loadSettings() {
    try {
      state.settings = await api('GET', '/api/settings');
      showSettings(state.settings);
    } catch (e) {
      showError(e);
    }
    renderPreview();
    drawCurve();
  }

  function showSettings(s) {
    if (s.bits) $('settings-radius').max = s.bits;
    $('settings-radius').value = s.max_distance;
    if (typeof s.min_similarity === 'number') $('settings-sim').value = s.min_similarity;
    $('settings-radius-box').hidden = s.mode === 'similarity';
    $('settings-sim-box').hidden = s.mode !== 'similarity';
    $('calibrate-use').textContent = s.mode === 'similarity' ? 'Use this similarity' : 'Use this radius';
    $('settings-det').value = s.det_threshold;
    settingsInput();
  }

  function settingsInput() {
    $('settings-radius-value').textContent = $('settings-radius').value;
    $('settings-sim-value').textContent = Number($('settings-sim').value).toFixed(3);
    $('settings-det-value').textContent = Number($('settings-det').value).toFixed(2);
    renderPreview();
    drawCurve();
  }

  // The acceptance threshold on the Settings page (not saved yet), and whether it accepts a candidate.
  function threshold() {
    return Number($(simMode() ? 'settings-sim' : 'settings-radius').value);
  }

  function accepts(c, t) {
    return simMode() ? typeof c.similarity === 'number' && c.similarity >= t : c.distance <= t;
  }

  function renderPreview() {
    const ul = $('settings-preview');
    ul.textContent = '';
    const limit = threshold();
    const det = Number($('settings-det').value);
    const r = state.last;
    const note = (text) => {
      const li = document.createElement('li');
      li.className = 'small';
      li.textContent = text;
      ul.append(li);
    };
    if (!r) {
      note('No frame recognised yet: open Live or Photos first.');
      return;
    }
    if (!r.results || !r.results.length) {
      note('The last frame had no objects.');
      return;
    }
    r.results.forEach((res, i) => {
      const cands = res.candidates || [];
      // The best candidate decides, as in the recogniser.
      const accepted = cands.length && accepts(cands[0], limit) ? cands[0] : null;
      const li = document.createElement('li');
      li.className = 'cand result' + (accepted ? '' : ' unknown');
      li.dataset.label = accepted ? accepted.label : '';
      const lowScore = !res.whole_image && typeof res.detection_score === 'number' && res.detection_score < det;
      const a = document.createElement('span');
      a.textContent = `${i + 1}: ${accepted ? accepted.label : 'unknown'}` + (lowScore ? ' (box below threshold)' : '');
      const d = document.createElement('span');
      d.className = 'd';
      d.textContent = cands.slice(0, 3).map((c) => `${c.label} ${closeness(c)}${accepts(c, limit) ? ' ✓' : ' ✗'}`).join(' · ')
        || 'no candidates';
      li.append(a, d);
      ul.append(li);
    });
  }

  async function saveSettings() {
    const body = { det_threshold: Number($('settings-det').value) };
    if (simMode()) body.min_similarity = threshold();
    else body.max_distance = threshold();
    try {
      state.settings = await api('PUT', '/api/settings', { json: body });
      showSettings(state.settings);
      const rule = simMode() ? `minimum similarity ${state.settings.min_similarity}`
        : `radius ${state.settings.max_distance} bits`;
      setStatus(`Saved: ${rule}, detector threshold ${state.settings.det_threshold}`, 'ok');
    } catch (e) {
      showError(e);
    }
  }

  async function calibrate() {
    const p = Number($('calibrate-precision').value || '0.95');
    $('calibrate-run').disabled = true;
    $('calibrate-result').textContent = 'Calibrating...';
    try {
      const r = await api('POST', '/api/calibrate', { json: { precision: p } });
      state.calib = r;
      let reached;
      if (typeof r.reached === 'boolean') reached = r.reached ? 'target reached' : 'target NOT reached';
      else if (typeof r.reached === 'number') reached = `precision reached ${r.reached.toFixed(3)}`;
      else reached = '';
      const chosen = typeof r.threshold !== 'number' ? 'none'
        : r.metric === 'similarity' ? r.threshold.toFixed(3) : String(r.threshold);
      const rule = r.metric === 'similarity' ? `Minimum similarity ${chosen}` : `Radius ${chosen} bits`;
      $('calibrate-result').textContent = `${rule} for precision ${r.target_precision}: ${reached}`
        + (r.items !== undefined ? ` (${r.items} items, ${r.labels} labels)` : '');
      $('calibrate-use').hidden = r.threshold === null || r.threshold === undefined;
      drawCurve();
    } catch (e) {
      $('calibrate-result').textContent = '';
      showError(e);
    } finally {
      $('calibrate-run').disabled = false;
    }
  }

  function drawCurve() {
    const c = $('calibrate-curve');
    if (c.offsetParent === null) return;
    const { ctx, w, h } = fitCanvas(c);
    const r = state.calib;
    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = '#6b747d';
    if (!r || !r.curve || !r.curve.length) {
      ctx.fillText(`Calibrate to see precision and recall by ${simMode() ? 'similarity' : 'radius'}`, 8, 16);
      return;
    }
    const pad = { l: 28, r: 8, t: 8, b: 18 };
    const sim = r.metric === 'similarity';
    const xs = r.curve.map((p) => p.threshold);
    const current = threshold();
    // Similarities: from a little below where every query is accepted (the curve is flat lower down) to 1.
    const flat = r.curve.filter((p) => p.recall !== null && p.unknown_accept_rate === 1).map((p) => p.threshold);
    const xmin = sim ? Math.max(-1, Math.min(flat.length ? Math.max(...flat) : -1, current, r.threshold ?? 1) - 0.05) : 0;
    const xmax = sim ? 1 : Math.max(...xs, r.threshold || 0, current, 1);
    const X = (t) => pad.l + ((t - xmin) / (xmax - xmin)) * (w - pad.l - pad.r);
    const inside = (p) => p.threshold >= xmin && p.threshold <= xmax;
    const Y = (v) => pad.t + (1 - v) * (h - pad.t - pad.b);
    ctx.strokeStyle = '#3c444d';
    ctx.lineWidth = 1;
    ctx.strokeRect(pad.l, pad.t, w - pad.l - pad.r, h - pad.t - pad.b);
    ctx.fillText('1', 12, Y(1) + 4);
    ctx.fillText('0', 12, Y(0));
    ctx.fillText(sim ? xmin.toFixed(2) : '0', pad.l, h - 4);
    ctx.fillText(sim ? 'similarity 1' : `${Math.round(xmax)} bits`, w - pad.r - (sim ? 64 : 44), h - 4);
    const series = [['precision', '#60a5fa'], ['recall', '#3ddc84'], ['unknown_accept_rate', '#f87171']];
    series.forEach(([key, color], k) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      let started = false;
      for (const p of r.curve) {
        if (typeof p[key] !== 'number' || !inside(p)) continue;
        if (!started) ctx.moveTo(X(p.threshold), Y(p[key]));
        else ctx.lineTo(X(p.threshold), Y(p[key]));
        started = true;
      }
      ctx.stroke();
      ctx.fillStyle = color;
      ctx.fillText(key === 'unknown_accept_rate' ? 'unknown accepted' : key, pad.l + 6 + k * 70, pad.t + 12);
    });
    const mark = (t, color, dash) => {
      ctx.strokeStyle = color;
      ctx.setLineDash(dash);
      ctx.beginPath();
      ctx.moveTo(X(t), pad.t);
      ctx.lineTo(X(t), h - pad.b);
      ctx.stroke();
      ctx.setLineDash([]);
    };
    if (typeof r.threshold === 'number') mark(r.threshold, '#facc15', []);
    mark(current, '#e8eaed', [4, 4]);
  }

  function useCalibrated() {
    if (!state.calib || typeof state.calib.threshold !== 'number') return;
    const sim = state.calib.metric === 'similarity';
    $(sim ? 'settings-sim' : 'settings-radius').value = state.calib.threshold;
    settingsInput();
    setStatus(sim ? `Minimum similarity set to ${state.calib.threshold.toFixed(3)}: press Save to keep it`
      : `Radius set to ${state.calib.threshold} bits: press Save to keep it`, 'ok');
  }

  // ------------------------------------------------------------------ photos

  async function addPhotos(files) {
    const list = [...files].filter((f) => !f.type || f.type.startsWith('image/'));
    if (!list.length) {
      setStatus('No image files among those', 'error');
      return;
    }
    for (const file of list) {
      try {
        const img = await decodeFile(file);
        const w = img.width || img.naturalWidth, h = img.height || img.naturalHeight;
        const canvas = scaledCanvas(img, w, h, STILL_MAX_SIDE);
        if (img.close) img.close();
        const blob = await toJpeg(canvas, 0.9);
        const r = await api('POST', '/api/recognize', { body: blob });
        state.last = r;
        photoCard(file.name, canvas, blob, r);
        setStatus(`${file.name}: ${(r.results || []).length} object(s)`, 'ok');
      } catch (e) {
        showError(e.message && e.message.includes(file.name) ? e : new Error(`${file.name}: ${e.message}`));
      }
    }
  }

  function photoCard(name, canvas, blob, r) {
    const card = document.createElement('div');
    card.className = 'photo';
    const view = document.createElement('canvas');
    view.width = canvas.width;
    view.height = canvas.height;
    const ctx = view.getContext('2d');
    ctx.drawImage(canvas, 0, 0);
    const sx = r.width && r.width !== canvas.width ? canvas.width / r.width : 1;
    drawBoxes(ctx, r.results, { x: 0, y: 0, s: sx }, { font: Math.max(14, Math.round(canvas.width / 40)) });
    const side = document.createElement('div');
    side.className = 'side';
    const title = document.createElement('div');
    title.className = 'small';
    title.textContent = `${name} (${canvas.width}x${canvas.height})`;
    const ul = document.createElement('ul');
    ul.className = 'results';
    renderResultList(ul, r.results);
    const b = document.createElement('button');
    b.className = 'btn to-enrol';
    b.textContent = 'Enrol from this photo';
    b.onclick = () => {
      showPage('enrol');
      setFrozen(canvas, blob, (r.results || []).map((x) => ({ ...x, box: x.box && x.box.map((v) => v * sx) })));
    };
    side.append(title, ul, b);
    card.append(view, side);
    $('photos-list').prepend(card);
  }

  function setupDrop() {
    const zone = $('photos-drop');
    const over = (e) => {
      e.preventDefault();
      zone.classList.add('over');
    };
    zone.addEventListener('dragenter', over);
    zone.addEventListener('dragover', over);
    zone.addEventListener('dragleave', () => zone.classList.remove('over'));
    // Dropping files anywhere must never navigate the kiosk away.
    window.addEventListener('dragover', (e) => e.preventDefault());
    window.addEventListener('drop', (e) => {
      e.preventDefault();
      zone.classList.remove('over');
      if (e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files.length) {
        showPage('photos');
        addPhotos(e.dataTransfer.files);
      }
    });
    $('photos-input').addEventListener('change', (e) => {
      const files = [...e.target.files];
      e.target.value = '';
      addPhotos(files);
    });
  }

  // ------------------------------------------------------------------ start

  function init() {
    readToken();
    document.querySelectorAll('.tab').forEach((t) => t.addEventListener('click', () => showPage(t.dataset.page)));
    $('token-save').onclick = () => tokenDone(true);
    $('token-cancel').onclick = () => tokenDone(false);
    $('token-input').addEventListener('keydown', (e) => { if (e.key === 'Enter') tokenDone(true); });
    $('live-pause').onclick = () => {
      state.paused = !state.paused;
      $('live-pause').textContent = state.paused ? 'Resume' : 'Pause';
    };
    $('enrol-freeze').onclick = freeze;
    $('enrol-unfreeze').onclick = unfreeze;
    $('enrol-save').onclick = saveEnrol;
    $('enrol-undo').onclick = undoEnrol;
    $('enrol-label').addEventListener('keydown', (e) => { if (e.key === 'Enter') saveEnrol(); });
    setupDrawing();
    $('gallery-filter').addEventListener('input', renderGallery);
    $('gallery-refresh').onclick = () => loadGallery(true);
    $('gallery-more').onclick = () => loadMore();
    $('settings-radius').addEventListener('input', settingsInput);
    $('settings-sim').addEventListener('input', settingsInput);
    $('settings-det').addEventListener('input', settingsInput);
    $('settings-save').onclick = saveSettings;
    $('settings-reset').onclick = loadSettings;
    $('calibrate-run').onclick = calibrate;
    $('calibrate-use').onclick = useCalibrated;
    setupDrop();
    window.addEventListener('resize', layoutChanged);
    for (const id of ['live-video', 'enrol-video']) $(id).addEventListener('loadedmetadata', layoutChanged);
    showPage('live');
    loadInfo();
    startCamera();
  }

  // For tests and debugging: the state, read-only by convention.
  window.edgeShitu = { state };
  init();
})();
