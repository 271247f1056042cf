"""Benchmark ``headscope atlas serve`` under load (prints a table; nothing is asserted).

For the current server and, with ``--old REF``, the ``http.server`` implementation at git ref REF
(e.g. ``--old 6a05e1f``, the last commit before uvicorn), on a tiny random model:

* threads held by ``--idle`` connections that never send a request;
* ``--requests`` live prompts sent ``--parallel`` at a time from 127.0.0.1: how many were answered 200,
  refused or reset, the wall time and the latency median / 95th percentile;
* whether every answer equals the answer to the same request sent alone.

Usage: ``python bench/atlas_server.py [--old 6a05e1f] [--requests 300] [--parallel 50] [--idle 200]``
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def load_old(ref: str):
    """The atlas server module as it was at git ref ``ref`` (imported under a private name)."""
    src = subprocess.run(["git", "show", f"{ref}:src/headscope/atlas/server.py"], capture_output=True, text=True,
                         check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_server.py"
    path.write_text(src.replace("from ..errors", "from headscope.errors").replace("from .live", "from headscope.atlas.live"))
    spec = importlib.util.spec_from_file_location("old_server", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def post(addr, body: str):
    t = time.perf_counter()
    try:
        c = http.client.HTTPConnection(*addr, timeout=120)
        c.request("POST", "/api/prompt", body=body, headers={"Content-Type": "application/json", "Host": "localhost"})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data, time.perf_counter() - t
    except (ConnectionError, OSError) as e:
        return type(e).__name__, b"", time.perf_counter() - t


def bench(mod, run_dir, model, args) -> dict:
    srv = mod.make_server(run_dir, model=model, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    addr = srv.server_address[:2]
    time.sleep(0.5)
    base = threading.active_count()
    idle = [socket.create_connection(addr) for _ in range(args.idle)]
    time.sleep(1.0)
    idle_threads = threading.active_count() - base
    for s in idle:
        s.close()
    words = "the cat sat on a mat and then ran far away from home".split()
    reqs = [json.dumps({"prompt": " ".join(words[i % 7: i % 7 + 3 + i % 5]) + f" {i % 30}",
                        "heads": [f"{i % 2}.{i % 4}", "1.0"]}) for i in range(30)]
    alone = [post(addr, r)[1] for r in reqs]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as ex:
        got = list(ex.map(lambda i: (i, *post(addr, reqs[i % len(reqs)])), range(args.requests)))
    wall = time.perf_counter() - t0
    srv.shutdown()
    srv.server_close()
    ok = [g for g in got if g[1] == 200]
    lat = np.array([g[3] for g in ok]) if ok else np.array([float("nan")])
    return {"idle_threads": idle_threads, "answered_200": len(ok), "other": len(got) - len(ok),
            "equal_to_alone": sum(g[2] == alone[g[0] % len(reqs)] for g in ok), "wall_s": wall,
            "p50_ms": 1000 * float(np.median(lat)), "p95_ms": 1000 * float(np.percentile(lat, 95))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default=None, help="git ref of the http.server implementation to compare with")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--parallel", type=int, default=50)
    ap.add_argument("--idle", type=int, default=200)
    args = ap.parse_args()
    from headscope.atlas import server as new
    from headscope.atlas.build import build_atlas
    from headscope.runs import RunDir
    from headscope.testing.tiny import tiny_model
    model = tiny_model("gpt2")
    run = RunDir(Path(tempfile.mkdtemp()) / "run", model.identity())
    build_atlas(run.path, progress=False)
    rows = [("uvicorn+starlette", bench(new, run.path, model, args))]
    if args.old:
        rows.append((f"http.server @ {args.old}", bench(load_old(args.old), run.path, model, args)))
    keys = list(rows[0][1])
    print(f"{args.requests} live prompts, {args.parallel} in parallel; {args.idle} idle connections; tiny gpt2")
    print(f"{'server':>24} " + " ".join(f"{k:>14}" for k in keys))
    for name, r in rows:
        print(f"{name:>24} " + " ".join(f"{r[k]:14.1f}" if isinstance(r[k], float) else f"{r[k]:>14}" for k in keys))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
