"""Where a profiled step's device time goes: kernels grouped from a jax.profiler Perfetto trace.

  python benchmarks/train_step.py ... --profile_dir=/tmp/prof
  python benchmarks/trace_summary.py /tmp/prof [--top=40]     # or the path of one trace file

Reads the newest `perfetto_trace.json.gz` under the folder (or the file given), keeps the complete events of the device
processes (names holding 'GPU' or 'TPU'; the host's CPU threads otherwise), and prints the total busy
time, then the kernels by total time with their count and share, then the same time grouped into
coarse kinds (matmul, attention, fusion, copy/transpose, reduce, collective, other) by name.
TRACE_THREAD=TEXT keeps only the threads whose name holds TEXT (a device's kernel stream, say, where
rows for XLA ops and for their kernels would otherwise both count).
"""

import collections
import glob
import gzip
import json
import os
import re
import sys

KINDS = [("attention", r"flash|fmha|cudnn|attention|splash|sdpa"), ("matmul", r"gemm|cublas|cutlass|nvjet|matmul|dot|wgmma|xmma|sm90"),
         ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|collective"),
         ("copy/transpose", r"copy|transpose|memcpy|memset|dynamic-update-slice|concatenate"),
         ("reduce", r"reduce"), ("fusion", r"fusion|loop_|input_|triton")]


def kind(name: str) -> str:
  low = name.lower()
  return next((k for k, pattern in KINDS if re.search(pattern, low)), "other")


def main(argv):
  folder, top = argv[1], 40
  for a in argv[2:]:
    if a.startswith("--top="):
      top = int(a.split("=", 1)[1])
  files = [folder] if os.path.isfile(folder) else sorted(
      glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
  if not files:
    sys.exit(f"no perfetto_trace.json.gz under {folder}")
  events = json.load(gzip.open(files[-1]))["traceEvents"]
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {p for p, n in procs.items() if "GPU" in n or "TPU" in n}
  keep = device or set(procs)
  print(f"{files[-1]}\nprocesses: {sorted(procs.values())}; summing {sorted(procs[p] for p in keep)}")
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  per_thread = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in keep and e.get("dur"):
      per_thread[threads.get((e["pid"], e.get("tid")), "?")] += e["dur"]
  print("threads (ms): " + ", ".join(f"{t} {d / 1e3:.1f}" for t, d in per_thread.most_common(8)))
  only = os.environ.get("TRACE_THREAD")  # e.g. a GPU's kernel stream, where op rows would double count
  by_name, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in keep and e.get("dur"):
      if only and only not in threads.get((e["pid"], e.get("tid")), ""):
        continue
      by_name[e["name"]] += e["dur"]
      count[e["name"]] += 1
  total = sum(by_name.values())
  print(f"busy time {total / 1e3:.1f} ms over {sum(count.values())} events (streams summed)")
  print("| kernel | calls | ms | share |\n|---|---|---|---|")
  for name, dur in by_name.most_common(top):
    print(f"| {name[:110]} | {count[name]} | {dur / 1e3:.2f} | {100 * dur / total:.1f}% |")
  kinds = collections.Counter()
  for name, dur in by_name.items():
    kinds[kind(name)] += dur
  print("| kind | ms | share |\n|---|---|---|")
  for k, dur in kinds.most_common():
    print(f"| {k} | {dur / 1e3:.1f} | {100 * dur / total:.1f}% |")


if __name__ == "__main__":
  main(sys.argv)
