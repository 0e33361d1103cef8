"""Watching the reverse process: which generated positions were committed at which step.

`terminal_view` prints one line per step (masked positions as `░`); `html_view` writes a self-contained
page that animates the answer filling in. Both take the `commit_step` list of a `serving.Completion`
(or a row of `GenerateOutput.commit_step_BL` after the prompt).
"""

from __future__ import annotations

import html
import json
from typing import Sequence

MASK_GLYPH = "░"


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
  return [tokenizer.decode([i]) for i in ids]


def terminal_view(tokenizer, ids: Sequence[int], commit_step: Sequence[int], width: int = 100) -> str:
  """One line per step at which something was committed: the answer so far, masks as `░`."""
  pieces = _pieces(tokenizer, ids)
  lines = []
  for step in sorted({s for s in commit_step if s >= 0}):
    text = "".join(p if 0 <= c <= step else MASK_GLYPH * max(1, len(p.strip()) or 1)
                   for p, c in zip(pieces, commit_step)).replace("\n", "⏎")
    lines.append(f"{step:4d} | {text[:width]}")
  return "\n".join(lines)


def html_view(tokenizer, prompt: str, ids: Sequence[int], commit_step: Sequence[int],
              title: str = "LLaDA reverse process") -> str:
  """A standalone HTML page: the prompt, then the answer's tokens revealed in commit order."""
  tokens = [{"text": p, "step": int(c)} for p, c in zip(_pieces(tokenizer, ids), commit_step)]
  last = max([t["step"] for t in tokens] + [0])
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; max-width: 48em; margin: 2em auto; }}
.prompt {{ color: #555; }} .tok {{ white-space: pre-wrap; transition: background 0.3s; }}
.masked {{ color: transparent; background: #ddd; border-radius: 3px; }}
.new {{ background: #ffe08a; }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<p>step <span id="step">0</span> / {last}</p>
<p><span class="prompt">{html.escape(prompt)}</span><span id="answer"></span></p>
<script>
const tokens = {json.dumps(tokens)};
const answer = document.getElementById("answer");
const spans = tokens.map(t => {{
  const s = document.createElement("span");
  s.className = "tok masked"; s.textContent = t.text || " "; answer.appendChild(s); return s; }});
let step = 0;
function tick() {{
  document.getElementById("step").textContent = step;
  tokens.forEach((t, i) => {{
    if (t.step === step) spans[i].className = "tok new";
    else if (t.step >= 0 && t.step < step) spans[i].className = "tok";
  }});
  step = step > {last} ? 0 : step + 1;
  setTimeout(tick, step === 0 ? 2000 : 250);
}}
tick();
</script></body></html>
"""
