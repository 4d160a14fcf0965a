"use strict";
// The chat page: one conversation streamed from /v1/chat/completions (server-sent events read through fetch).
// Model and user text only ever reach the page through textContent, never as HTML.
(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    apiKey: $("api-key"), system: $("system"), temperature: $("temperature"), maxTokens: $("max-tokens"),
    rag: $("rag"), model: $("model"), clear: $("clear"), messages: $("messages"), status: $("status"),
    composer: $("composer"), message: $("message"), send: $("send"), stop: $("stop"),
  };
  const KEY_STORAGE = "tokenmill.apiKey";

  let modelName = null;
  let history = [];       // the finished turns, as the API takes them
  let controller = null;  // aborts the answer in flight
  let conversation = 0;   // bumped by "New chat", so that an answer still finishing does not join the new one

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(text) {
    els.status.textContent = text || "";
  }

  function headers() {
    const result = { "Content-Type": "application/json" };
    const key = els.apiKey.value.trim();
    if (key) result.Authorization = `Bearer ${key}`;
    return result;
  }

  async function errorMessage(response) {
    let message = "";
    try {
      const body = await response.json();
      message = (body && body.error && body.error.message) || "";
    } catch (e) {
      // not JSON: the status line says enough
    }
    if (response.status === 401) {
      return `The server needs an API key (${message || "unauthorized"}): enter it in the API key field.`;
    }
    return `Error ${response.status}: ${message || response.statusText}`;
  }

  // ---- the served model --------------------------------------------------------------------------------------

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) {
        modelName = null;
        els.model.textContent = "no model";
        setStatus(await errorMessage(response));
        if (response.status === 503) setTimeout(loadModel, 2000);  // still loading
        return;
      }
      const body = await response.json();
      modelName = body.data && body.data.length ? body.data[0].id : null;
      els.model.textContent = modelName || "no model";
      setStatus("");
    } catch (e) {
      setStatus(`Cannot reach the server: ${e.message}`);
    }
  }

  // ---- messages on the page ----------------------------------------------------------------------------------

  function nearBottom() {
    const m = els.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 40;
  }

  function follow(wasNearBottom) {
    if (wasNearBottom) els.messages.scrollTop = els.messages.scrollHeight;
  }

  function addMessage(role, text) {
    const stick = nearBottom();
    const box = element("div", `message ${role}`);
    const content = element("div", "content", text);
    box.append(element("div", "role", role === "user" ? "You" : modelName || "assistant"), content);
    els.messages.append(box);
    follow(stick);
    return { box, content, text, reasoning: null, reasoningText: "", citations: null };
  }

  function appendContent(bubble, piece) {
    const stick = nearBottom();
    bubble.text += piece;
    bubble.content.textContent = bubble.text;
    follow(stick);
  }

  function appendReasoning(bubble, piece) {
    const stick = nearBottom();
    if (!bubble.reasoning) {
      const details = element("details", "reasoning");
      details.append(element("summary", "", "Reasoning"));
      bubble.reasoning = element("div", "reasoning-text");
      details.append(bubble.reasoning);
      bubble.box.insertBefore(details, bubble.content);
    }
    bubble.reasoningText += piece;
    bubble.reasoning.textContent = bubble.reasoningText;
    follow(stick);
  }

  function addNote(bubble, className, text) {
    bubble.box.append(element("div", className, text));
  }

  // rag/grounding.py's citations: number, source, start, end, title, score, text, cited, quotes. The first chunk
  // lists the sources; the last lists them again with what the answer cites and quotes, and replaces them here.
  function showCitations(bubble, citations) {
    if (!Array.isArray(citations)) return;
    const wasOpen = bubble.citations ? bubble.citations.open : false;
    const details = element("details", "citations");
    details.open = wasOpen;
    details.append(element("summary", "", `Sources (${citations.length})`));
    const list = element("ol");
    for (const c of citations) {
      const item = element("li");
      if (Number.isInteger(c.number)) item.value = c.number;
      const head = element("div");
      head.append(element("strong", "", c.title || c.source || "source"));
      const score = typeof c.score === "number" ? `, score ${c.score.toFixed(3)}` : "";
      head.append(element("span", "where", ` ${c.source}:${c.start}-${c.end}${score}`));
      if (c.cited) head.append(element("span", "cited", "cited"));
      item.append(head);
      const quoted = Array.isArray(c.quotes) && c.quotes.length;
      const text = quoted ? c.quotes.map((q) => `\u201c${q}\u201d`).join("\n") : String(c.text || "");
      item.append(element("blockquote", "", text.length > 400 ? `${text.slice(0, 400)}\u2026` : text));
      list.append(item);
    }
    details.append(list);
    if (bubble.citations) bubble.citations.replaceWith(details);
    else bubble.box.append(details);
    bubble.citations = details;
  }

  // ---- one answer --------------------------------------------------------------------------------------------

  // -> the finish reason of the answer, or throws the stream's error event
  async function readStream(response, bubble) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let finish = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return finish;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();  // an incomplete line waits for the rest
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(`Error: ${chunk.error.message || "the stream failed"}`);
        if (chunk.citations) showCitations(bubble, chunk.citations);
        for (const choice of chunk.choices || []) {
          if (choice.index !== 0) continue;
          const delta = choice.delta || {};
          const thought = delta.reasoning_content || delta.reasoning;  // the server sends both names
          if (thought) appendReasoning(bubble, thought);
          if (delta.content) appendContent(bubble, delta.content);
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  }

  function requestBody(userText) {
    const messages = [];
    const system = els.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...history, { role: "user", content: userText });
    const body = { messages, stream: true };
    if (modelName) body.model = modelName;
    const temperature = parseFloat(els.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(els.maxTokens.value, 10);
    if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
    if (els.rag.checked) body.rag = true;
    return body;
  }

  function setBusy(busy) {
    els.send.disabled = busy;
    els.stop.disabled = !busy;
  }

  async function send() {
    const text = els.message.value;
    if (!text.trim() || controller) return;
    const turn = conversation;
    els.message.value = "";
    setStatus("");
    const user = addMessage("user", text);
    const bubble = addMessage("assistant", "");
    const body = requestBody(text);
    controller = new AbortController();
    setBusy(true);
    let outcome = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!response.ok) {
        const message = await errorMessage(response);
        if (response.status === 401) {
          setStatus(message);
          els.apiKey.focus();
        }
        throw new Error(message);
      }
      outcome = await readStream(response, bubble);
    } catch (e) {
      if (e.name === "AbortError") {
        outcome = "stopped";
      } else {
        addNote(bubble, "error", e.message);
      }
    } finally {
      controller = null;
      setBusy(false);
    }
    if (turn !== conversation) return;
    if (outcome === "stopped") addNote(bubble, "note", "stopped");
    if (outcome === "length") addNote(bubble, "note", "stopped at the max tokens limit");
    if (bubble.text) {
      history.push({ role: "user", content: text }, { role: "assistant", content: bubble.text });
    } else {
      // nothing came back: the message is not part of the conversation; give it back to edit or resend
      user.box.classList.add("failed");
      if (!els.message.value) els.message.value = text;
    }
  }

  function newChat() {
    conversation += 1;
    if (controller) controller.abort();
    history = [];
    els.messages.replaceChildren();
    setStatus("");
    els.message.focus();
  }

  // ---- wiring ------------------------------------------------------------------------------------------------

  try {
    els.apiKey.value = localStorage.getItem(KEY_STORAGE) || "";
  } catch (e) {
    // storage disabled: the key lives in the field only
  }
  let keyTimer = null;
  els.apiKey.addEventListener("input", () => {
    try {
      localStorage.setItem(KEY_STORAGE, els.apiKey.value.trim());
    } catch (e) {
      // as above
    }
    clearTimeout(keyTimer);
    keyTimer = setTimeout(loadModel, 300);
  });
  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  els.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      els.composer.requestSubmit();
    }
  });
  els.stop.addEventListener("click", () => controller && controller.abort());
  els.clear.addEventListener("click", newChat);
  loadModel();
})();
