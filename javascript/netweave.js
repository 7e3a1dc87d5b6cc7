// NetWeave's prompt-box helpers, loaded as-is by A1111/Forge/SD.Next (javascript/*.js) and by
// the standalone page: completion inside <lora:…>, <lyco:…>, <loractl:…> and <model:…> tags
// (network names, keys, lbw presets, mask names, interpolations) and inline validation through
// POST /netweave/v1/parse. Nothing here blocks typing or takes keys the host uses: the list
// only handles arrows, Enter, Tab and Escape while it is open, never with Ctrl (the host's
// Ctrl+↑/↓ weight editing), and the textarea's value is only changed on a pick.
(function () {
    "use strict";

    // A1111/Forge/SD.Next's boxes (SD.Next's Control tab: control_*), the standalone page's
    var PROMPTS = ["#txt2img_prompt textarea", "#img2img_prompt textarea",
        "#txt2img_neg_prompt textarea", "#img2img_neg_prompt textarea",
        "#txt2img_hr_prompt textarea", "#txt2img_hr_neg_prompt textarea",
        "#control_prompt textarea", "#control_neg_prompt textarea",
        "#netweave_prompt textarea"];
    var API = "/netweave/v1";
    var DEBOUNCE_MS = 400;
    var cache = {};

    function app() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function getJSON(path) {  // cached for the page's life; a failed fetch is retried later
        if (!cache[path]) {
            cache[path] = fetch(API + path).then(function (r) {
                if (!r.ok) { throw new Error(r.status); }
                return r.json();
            }).catch(function (e) { delete cache[path]; throw e; });
        }
        return cache[path];
    }

    // ---- where the caret is: inside which tag, typing what ----------------------------------
    function tagAt(text, caret) {
        var open = text.lastIndexOf("<", caret - 1);
        if (open < 0 || text.lastIndexOf(">", caret - 1) > open) { return null; }
        var inside = text.slice(open + 1, caret);
        var m = /^(lora|lyco|loractl|model):/i.exec(inside);
        if (!m) { return null; }
        var kind = m[1].toLowerCase();
        var items = inside.slice(m[0].length).split(":");
        var last = items[items.length - 1];
        var start = caret - last.length;
        if (items.length === 1) { return {kind: kind, what: "name", typed: last, start: start}; }
        var eq = last.indexOf("=");
        if (eq < 0) { return {kind: kind, what: "key", typed: last, start: start}; }
        var key = last.slice(0, eq).toLowerCase();
        var value = last.slice(eq + 1);
        if (key === "region") {  // complete the last operand of a region expression
            var operand = /[A-Za-z0-9_-]*$/.exec(value)[0];
            return {kind: kind, what: "region", typed: operand, start: caret - operand.length};
        }
        var what = {lbw: "preset", w: "preset", interp: "interp"}[key];
        return what ? {kind: kind, what: what, typed: value, start: caret - value.length} : null;
    }

    function candidates(ctx) {
        if (ctx.what === "name") {
            return getJSON("/networks").then(function (data) {
                var want = ctx.kind === "model" ? "model" : "lora";
                return data.networks.filter(function (n) { return n.kind === want; })
                    .map(function (n) { return n.name; });
            });
        }
        if (ctx.what === "region") {
            return Promise.all([getJSON("/vocabulary"), fetch(API + "/masks").then(function (r) {
                return r.json();
            })]).then(function (both) {
                return both[1].masks.map(function (m) { return m.name; }).concat(both[0].regions);
            });
        }
        return getJSON("/vocabulary").then(function (v) {
            if (ctx.what === "key") { return v.keys.map(function (k) { return k + "="; }); }
            return ctx.what === "preset" ? v.presets : v.interpolations;
        });
    }

    // ---- the completion list ----------------------------------------------------------------
    function List(textarea, below) {
        this.textarea = textarea;
        this.below = below;  // the problems box: the list opens under it, never over it
        this.el = document.createElement("ul");
        this.el.className = "netweave-complete";
        this.el.setAttribute("role", "listbox");
        this.el.style.cssText = "position:absolute;z-index:1000;margin:0;padding:2px 0;" +
            "list-style:none;background:var(--background-fill-primary,#fff);color:inherit;" +
            "border:1px solid var(--border-color-primary,#999);max-height:12em;overflow:auto;" +
            "font-size:90%;display:none";
        document.body.appendChild(this.el);
        this.items = [];
        this.active = 0;
    }

    List.prototype.show = function (ctx, names) {
        var typed = ctx.typed.toLowerCase();
        this.ctx = ctx;
        this.items = names.filter(function (n) {
            return n.toLowerCase().indexOf(typed) === 0 && n.toLowerCase() !== typed;
        }).slice(0, 50);
        if (!this.items.length) { this.hide(); return; }
        this.active = 0;
        var self = this;
        this.el.innerHTML = "";
        this.items.forEach(function (name, i) {
            var li = document.createElement("li");
            li.textContent = name;
            li.setAttribute("role", "option");
            li.style.cssText = "padding:1px 8px;cursor:pointer";
            li.addEventListener("mousedown", function (e) { e.preventDefault(); self.pick(i); });
            self.el.appendChild(li);
        });
        this.el.style.display = "block";
        this.place();
        this.mark();
    };

    List.prototype.place = function () {  // again whenever the problems box changes size
        var box = this.textarea.getBoundingClientRect();
        var bottom = Math.max(box.bottom, this.below.getBoundingClientRect().bottom);
        this.el.style.left = (window.scrollX + box.left) + "px";
        this.el.style.top = (window.scrollY + bottom) + "px";
    };

    List.prototype.mark = function () {
        var self = this;
        Array.prototype.forEach.call(this.el.children, function (li, i) {
            li.style.background = i === self.active ? "var(--color-accent-soft,#cde)" : "";
            li.setAttribute("aria-selected", i === self.active ? "true" : "false");
        });
    };

    List.prototype.hide = function () {
        this.el.style.display = "none";
        this.items = [];
    };

    List.prototype.open = function () { return this.items.length > 0; };

    List.prototype.pick = function (i) {
        var t = this.textarea, ctx = this.ctx, caret = t.selectionStart;
        var choice = this.items[i];
        t.value = t.value.slice(0, ctx.start) + choice + t.value.slice(caret);
        var at = ctx.start + choice.length;
        t.setSelectionRange(at, at);
        this.hide();
        changed(t);
    };

    function changed(textarea) {  // Gradio listens for input events
        if (typeof updateInput === "function") { updateInput(textarea); } else {
            textarea.dispatchEvent(new Event("input", {bubbles: true}));
        }
    }

    // ---- inline validation ------------------------------------------------------------------
    function problemsBox(textarea) {
        var box = document.createElement("div");
        box.className = "netweave-problems";
        box.setAttribute("role", "status");
        // monospace: the caret line under a snippet points at its column
        box.style.cssText = "color:var(--error-text-color,#c00);font-size:85%;white-space:pre-wrap;" +
            "font-family:var(--font-mono,ui-monospace,monospace)";
        textarea.parentNode.insertBefore(box, textarea.nextSibling);
        return box;
    }

    function validate(textarea, box, shown) {
        var text = textarea.value;
        if (!/<(lora|lyco|loractl|model):/i.test(text)) {
            box.textContent = "";
            box.dataset.checked = text;
            textarea.removeAttribute("aria-invalid");
            return;
        }
        fetch(API + "/parse", {method: "POST", headers: {"Content-Type": "application/json"},
            body: JSON.stringify({prompt: text})})
            .then(function (r) { return r.ok ? r.json() : null; })
            .then(function (plan) {
                if (!plan || textarea.value !== text) { return; }  // typed on meanwhile
                var errors = plan.errors || [];
                box.textContent = errors.map(function (e) {
                    return "column " + e.column + ": " + e.message + "\n" + e.snippet;
                }).join("\n");
                box.dataset.checked = text;  // which text the box speaks for (tests wait on it)
                shown();
                if (errors.some(function (e) { return e.severity === "error"; })) {
                    textarea.setAttribute("aria-invalid", "true");
                } else {
                    textarea.removeAttribute("aria-invalid");
                }
            })
            .catch(function () { /* the server is busy or gone: say nothing */ });
    }

    // ---- wiring -----------------------------------------------------------------------------
    function attach(textarea) {
        if (textarea.dataset.netweave) { return; }
        textarea.dataset.netweave = "1";
        var box = problemsBox(textarea);
        var list = new List(textarea, box);
        var timer = null;

        function complete() {
            var ctx = tagAt(textarea.value, textarea.selectionStart);
            if (!ctx) { list.hide(); return; }
            candidates(ctx).then(function (names) {
                var now = tagAt(textarea.value, textarea.selectionStart);
                if (now && now.start === ctx.start && now.typed === ctx.typed) {
                    list.show(ctx, names);
                }
            }).catch(function () { list.hide(); });
        }

        textarea.addEventListener("input", function () {
            if (textarea.value !== box.dataset.checked) {  // it spoke of the text before
                box.textContent = "";
                textarea.removeAttribute("aria-invalid");
            }
            complete();
            clearTimeout(timer);
            timer = setTimeout(function () {
                validate(textarea, box, function () { if (list.open()) { list.place(); } });
            }, DEBOUNCE_MS);
        });
        textarea.addEventListener("keydown", function (e) {
            if (!list.open() || e.ctrlKey || e.metaKey || e.altKey) { return; }
            if (e.key === "ArrowDown" || e.key === "ArrowUp") {
                list.active = (list.active + (e.key === "ArrowDown" ? 1 : -1) +
                    list.items.length) % list.items.length;
                list.mark();
            } else if (e.key === "Enter" || e.key === "Tab") {
                list.pick(list.active);
            } else if (e.key === "Escape") {
                list.hide();
            } else {
                return;
            }
            e.preventDefault();
            e.stopPropagation();
        }, true);
        textarea.addEventListener("blur", function () { list.hide(); });
    }

    function scan() {
        PROMPTS.forEach(function (sel) {
            Array.prototype.forEach.call(app().querySelectorAll(sel), attach);
        });
    }

    // Gradio renders late and re-renders tabs: look again now and then (cheap: a few queries)
    if (typeof onUiLoaded === "function") { onUiLoaded(scan); }
    document.addEventListener("DOMContentLoaded", scan);
    setInterval(scan, 1000);
    window.netweaveTagAt = tagAt;  // for tests and other scripts
})();
