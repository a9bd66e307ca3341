"""One STEP line per scheduler step (its plan, then its result) and per vision batch, for finding where a loaded
cluster's time goes (how full the decode batches are, which steps carry prompts, how long each runs on the worker,
how the tower's batches fall). Debugging aid, not imported by the services; load it into every process through a
.pth file, as the stage trace does, then run a load and summarise:

    cp benchmarks/step_trace/hook.py "$SITE/mirador_step_trace.py"
    echo "import mirador_step_trace" > "$SITE/mirador_step_trace.pth"   # $SITE: a site-packages directory
    mirador up ... > cluster.log 2>&1 &   # then e.g. mirador bench --max-concurrency 64 ...
    python -m benchmarks.step_trace.analyze cluster.log 3   # steps after the first 3 s
"""

import os
import sys
import time


def _log(msg):
    print(f"STEP {time.time() * 1e3:.3f} {msg}", file=sys.stderr, flush=True)


def _install():
    argv = " ".join(getattr(sys, "orig_argv", None) or sys.argv)
    if "mirador" not in argv:
        return
    sys.path.insert(0, os.getcwd())  # ours first: an installed wheel may ship a top-level `models` package
    if " vision" in f" {argv} ":
        _install_vision()
    if " gateway" in f" {argv} ":
        _install_gateway()
    if " scheduler" not in f" {argv} ":
        return
    from scheduler_svc.scheduler import Scheduler

    orig_schedule, orig_output, orig_encoded = (
        Scheduler.schedule,
        Scheduler.process_output,
        Scheduler.on_encoded,
    )

    def schedule(self):
        plan = orig_schedule(self)
        if plan is not None:
            ptok = pseq = dec = 0
            for s in plan.seqs:
                if len(s.input_ids) > 1 or s.init is not None:
                    pseq += 1
                    ptok += s.num_tokens
                else:
                    dec += 1
            dec += len(plan.decode_seq_ids)
            _log(
                f"plan id={plan.step_id} pseq={pseq} ptok={ptok} dec={dec} pref={len(plan.prefetch_keys)} "
                f"run={len(self.running)} wait={len(self.waiting)}"
            )
        return plan

    def process_output(self, out):
        _log(
            f"out id={out.step_id} start={out.start_unix_ns / 1e6:.3f} end={out.end_unix_ns / 1e6:.3f} "
            f"fwd={out.forward_ns / 1e6:.3f} prep={out.prepare_ns / 1e6:.3f} ntok={out.num_tokens}"
        )
        return orig_output(self, out)

    def on_encoded(self, request_id, keys, *a, **kw):
        _log(f"encoded rid={request_id} n={len(keys)}")
        return orig_encoded(self, request_id, keys, *a, **kw)

    Scheduler.schedule, Scheduler.process_output, Scheduler.on_encoded = schedule, process_output, on_encoded


def _install_gateway():
    """`gw n=` lines: requests in the gateway (from the handler's start to the end of their event stream); `gwb n=`:
    requests building their prompt; `gws n=`: requests between the scheduler client's generate and its end."""
    import gateway.app  # noqa: F401 - the handler is built inside create_app: count at the ASGI app instead
    from gateway.sse import EventStreamResponse

    live = [0]
    orig_call = EventStreamResponse.__call__

    async def call(self, scope, receive, send):
        try:
            return await orig_call(self, scope, receive, send)
        finally:
            live[0] -= 1
            _log(f"gw n={live[0]}")

    EventStreamResponse.__call__ = call
    from starlette.routing import Route

    orig_handle = Route.handle

    async def handle(self, scope, receive, send):
        if scope.get("method") == "POST":
            live[0] += 1
            _log(f"gw n={live[0]}")
        return await orig_handle(self, scope, receive, send)

    Route.handle = handle

    from processor.request_builder import RequestBuilder
    from scheduler_svc.client import SchedulerClient

    building, submitted = [0], [0]
    orig_build, orig_generate = RequestBuilder.from_messages, SchedulerClient.generate

    async def from_messages(self, *a, **kw):
        building[0] += 1
        _log(f"gwb n={building[0]}")
        try:
            return await orig_build(self, *a, **kw)
        finally:
            building[0] -= 1
            _log(f"gwb n={building[0]}")

    async def generate(self, req):
        submitted[0] += 1
        _log(f"gws n={submitted[0]}")
        try:
            async for out in orig_generate(self, req):
                yield out
        finally:
            submitted[0] -= 1
            _log(f"gws n={submitted[0]}")

    RequestBuilder.from_messages, SchedulerClient.generate = from_messages, generate


def _install_vision():
    from vision_svc.encoder import VisionEncoder

    orig = VisionEncoder.launch_batch

    def launch_batch(self, batch, early=None):
        t0 = time.time() * 1e3
        out, finish = orig(self, batch, early)
        t1 = time.time() * 1e3

        def fin():
            finish()
            _log(f"vbatch n={len(batch)} start={t0:.3f} queued={t1:.3f}")

        return out, fin

    VisionEncoder.launch_batch = launch_batch


try:
    _install()
except Exception as e:  # noqa: BLE001
    print("STEP install failed", e, file=sys.stderr)
