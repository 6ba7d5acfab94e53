// The app's result area (minicosy/player.py): a status line that ticks while a request runs, gapless
// live playback of streamed chunks with the Web Audio API, then one <audio> player of the whole
// utterance to replay and download. The chunk schedule is kept in data-schedule for tests.
function render({ model, el }) {
  el.classList.add("minicosy-player");
  el.innerHTML = `
    <div class="mc-status" role="status"></div>
    <div class="mc-live"><span class="mc-live-text"></span> <button class="mc-stop jupyter-button" style="display: none">stop</button></div>
    <div class="mc-whole"></div>`;
  const status = el.querySelector(".mc-status");
  const liveText = el.querySelector(".mc-live-text");
  const stop = el.querySelector(".mc-stop");
  const whole = el.querySelector(".mc-whole");
  let ctx = null, sources = [], schedule = [], nextStart = 0, underruns = 0, started = 0, timer = null, url = null;

  function showStatus() {
    const error = model.get("error");
    status.className = "mc-status" + (error ? " mc-error" : model.get("busy") ? " mc-busy" : "");
    if (error) { status.textContent = "⚠ " + error; return; }
    const elapsed = model.get("busy") ? ` · ${((performance.now() - started) / 1000).toFixed(1)} s elapsed` : "";
    status.textContent = model.get("progress") + elapsed;
  }
  function onBusy() {
    clearInterval(timer);
    if (model.get("busy")) { started = performance.now(); timer = setInterval(showStatus, 200); }
    showStatus();
  }
  function silence() {
    sources.forEach((s) => { try { s.stop(); } catch (e) { /* not started */ } });
    sources = [];
    stop.style.display = "none";
  }
  function reset() {
    silence();
    el.dataset.requests = String(Number(el.dataset.requests || 0) + 1);
    schedule = []; underruns = 0; nextStart = 0;
    el.dataset.schedule = "[]";
    liveText.textContent = "";
  }
  function play(samples, rate) {
    if (!ctx) ctx = new AudioContext();
    if (ctx.state === "suspended") ctx.resume();
    const buffer = ctx.createBuffer(1, samples.length, rate);
    buffer.copyToChannel(samples, 0);
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    const now = ctx.currentTime;
    if (schedule.length && nextStart < now) underruns += 1;     // the chunk came after the last one ended
    const start = Math.max(nextStart, now + 0.05);              // back to back; 50 ms of slack to start
    source.start(start);
    source.onended = () => {
      sources = sources.filter((s) => s !== source);
      if (!sources.length) stop.style.display = "none";
    };
    sources.push(source);
    nextStart = start + buffer.duration;
    schedule.push({ arrival: now, start: start, duration: buffer.duration });
    el.dataset.schedule = JSON.stringify(schedule);
    stop.style.display = "";
    const total = schedule.reduce((s, c) => s + c.duration, 0);
    liveText.textContent = `▶ playing as it arrives: ${schedule.length} chunk${schedule.length > 1 ? "s" : ""}, ` +
      `${total.toFixed(2)} s` + (underruns ? ` (${underruns} pause${underruns > 1 ? "s" : ""}: synthesis ` +
      "ran slower than real time)" : "");
  }
  function showWhole() {
    if (url) URL.revokeObjectURL(url);
    url = null;
    whole.innerHTML = "";
    const wav = model.get("wav");
    if (!wav || !wav.byteLength) return;
    url = URL.createObjectURL(new Blob([wav], { type: "audio/wav" }));
    whole.innerHTML = `<span>whole utterance:</span> <audio controls preload="metadata"></audio>
      <a download="${model.get("filename")}">download ${model.get("filename")}</a>`;
    whole.querySelector("audio").src = url;
    whole.querySelector("a").href = url;
  }

  stop.addEventListener("click", silence);
  model.on("msg:custom", (msg, buffers) => {
    if (msg.type === "reset") reset();
    if (msg.type === "chunk") {
      const view = buffers[0];
      play(new Float32Array(view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength)), msg.rate);
    }
  });
  model.on("change:busy", onBusy);
  model.on("change:progress", showStatus);
  model.on("change:error", showStatus);
  model.on("change:wav", showWhole);
  onBusy();
  showWhole();
  return () => { clearInterval(timer); silence(); if (ctx) ctx.close(); if (url) URL.revokeObjectURL(url); };
}
export default { render };
