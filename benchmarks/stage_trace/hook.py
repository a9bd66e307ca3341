"""Wall-clock stamps of a request's stages in every Mirador process, for finding where time to first token goes.

Debugging aid, not imported by the services. Load it into each process through a .pth file, run a cluster and
requests one at a time, then read the timeline:

    cp benchmarks/stage_trace/hook.py "$SITE/mirador_stage_trace.py"
    echo "import mirador_stage_trace" > "$SITE/mirador_stage_trace.pth"   # $SITE: a site-packages directory
    mirador up ... > cluster.log 2>&1 &   # then e.g. mirador bench --max-concurrency 1 ...
    python -m benchmarks.stage_trace.analyze cluster.log
"""

import functools
import inspect
import os
import sys
import time


def _log(label):
    print(f"TRACE {time.time() * 1e3:.3f} {os.getpid()} {label}", file=sys.stderr, flush=True)


def _wrap(cls, name, label):
    fn = getattr(cls, name)
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def aw(*a, **kw):
            _log(label + " start")
            try:
                return await fn(*a, **kw)
            finally:
                _log(label + " end")

        setattr(cls, name, aw)
    else:

        @functools.wraps(fn)
        def w(*a, **kw):
            _log(label + " start")
            try:
                return fn(*a, **kw)
            finally:
                _log(label + " end")

        setattr(cls, name, w)


def _install():
    argv = " ".join(getattr(sys, "orig_argv", None) or sys.argv)
    if "mirador" not in argv:
        return
    role = next((r for r in ("gateway", "scheduler", "worker", "vision") if f" {r} " in f" {argv} "), None)
    if role == "gateway":
        from gateway.serving import OpenAIServing
        from processor.request_builder import RequestBuilder

        _wrap(OpenAIServing, "chat", "gw.chat")
        _wrap(RequestBuilder, "from_messages", "gw.build")
    elif role == "scheduler":
        from scheduler_svc.loop import SchedulerLoop
        from scheduler_svc.scheduler import Scheduler

        _wrap(Scheduler, "add_request", "sch.add")
        _wrap(SchedulerLoop, "_encode", "sch.encode")
        _wrap(Scheduler, "on_encoded", "sch.on_encoded")
        _wrap(Scheduler, "process_output", "sch.output")
        orig = Scheduler.schedule

        def schedule(self):
            plan = orig(self)
            if plan is not None:
                _log(
                    f"sch.plan {len(plan.seqs) + len(plan.decode_seq_ids)} seqs {plan.num_tokens} tok prefetch={len(plan.prefetch_keys)}"
                )
            return plan

        Scheduler.schedule = schedule
    elif role == "vision":
        from vision_svc.encoder import VisionEncoder
        from vision_svc.server import VisionServicer

        _wrap(VisionServicer, "Encode", "vis.Encode")
        _wrap(VisionServicer, "Prepare", "vis.Prepare")  # the gateway's decode hint
        _wrap(VisionEncoder, "prepare", "vis.prepare")
        _wrap(VisionEncoder, "launch_batch", "vis.batch")  # answered once queued on the device
        _wrap(VisionServicer, "GetEmbeddings", "vis.GetEmbeddings")
    elif role == "worker":
        from worker_svc.embeddings import ResidentEmbeddings
        from worker_svc.model_runner import ModelRunner

        _wrap(ModelRunner, "launch", "wk.launch")
        _wrap(ModelRunner, "collect", "wk.collect")
        _wrap(ModelRunner, "_fetch_embeddings", "wk.fetch")
        _wrap(ResidentEmbeddings, "_pull", "wk.pull")
        from vision_svc.client import VisionEmbeddingSource

        _wrap(VisionEmbeddingSource, "take", "wk.take")  # the lease's copy, behind the pool's ready event


try:
    _install()
except Exception as e:  # noqa: BLE001
    print("TRACE install failed", e, file=sys.stderr)
