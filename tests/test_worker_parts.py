"""The worker's GPU-path pieces that need no GPU: dummy weights and bundled configs, packed step inputs, graph
batch sizes, KV sizing arithmetic."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from models.loader import checkpoint_shapes, load_model
from models.registry import language_model_class
from processor.model_config import load_model_config
from worker_svc import memory
from worker_svc.cuda_graphs import capture_sizes
from worker_svc.piecewise_graphs import token_sizes
from worker_svc.step_inputs import ALIGN, SeqInputs, StepInputs, Updates, graph_buffer_size, graph_views


@pytest.fixture(scope="module")
def config_only_dir(default_model, tmp_path_factory):
    """The embedded model's directory without its weights."""
    d = tmp_path_factory.mktemp("config-only")
    for f in default_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    return d


def test_dummy_weights_are_deterministic_and_finite(config_only_dir):
    cfg = load_model_config(config_only_dir)
    cls = language_model_class(cfg.architecture)
    a = load_model(cls, cfg, config_only_dir, torch.float32, torch.device("cpu"), "dummy")
    b = load_model(cls, cfg, config_only_dir, torch.float32, torch.device("cpu"), "dummy")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and torch.isfinite(sa[k]).all() for k in sa)
    assert not torch.equal(
        sa["model.layers.0.self_attn.qkv_proj.weight"], sa["model.layers.1.self_attn.qkv_proj.weight"]
    )
    ids = torch.arange(5)
    h = a.model.embed_tokens(ids)
    assert torch.isfinite(a.compute_logits(h)).all()
    with pytest.raises(FileNotFoundError, match="--load-format dummy"):
        load_model(cls, cfg, config_only_dir, torch.float32, torch.device("cpu"))


def test_checkpoint_names_split_fused_parameters(default_model):
    cfg = load_model_config(default_model)
    with torch.device("meta"):
        model = language_model_class(cfg.architecture)(cfg)
    names = checkpoint_shapes(model)
    text = cfg.text
    assert names["model.layers.0.self_attn.q_proj.weight"] == (
        text.num_attention_heads * text.head_dim,
        text.hidden_size,
    )
    assert names["model.layers.0.self_attn.k_proj.bias"] == (text.num_key_value_heads * text.head_dim,)
    assert names["model.layers.0.mlp.up_proj.weight"] == (text.intermediate_size, text.hidden_size)
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)


@pytest.mark.parametrize(
    "name,layers,hidden,heads,kv_heads,vocab",
    [
        ("Qwen/Qwen2.5-VL-3B-Instruct", 36, 2048, 16, 2, 151936),
        ("Qwen/Qwen2.5-VL-7B-Instruct", 28, 3584, 28, 4, 152064),
        ("qwen2.5-vl-72b-instruct", 80, 8192, 64, 8, 152064),
        ("Qwen/Qwen2-VL-7B-Instruct", 28, 3584, 28, 4, 152064),
    ],
)
def test_bundled_configs_resolve_offline_for_dummy_weights(name, layers, hidden, heads, kv_heads, vocab):
    from processor.hub import resolve_model_path

    path = resolve_model_path(name, "dummy")
    cfg = load_model_config(path)
    t = cfg.text
    assert (t.num_hidden_layers, t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.vocab_size) == (
        layers, hidden, heads, kv_heads, vocab
    )  # fmt: skip
    assert cfg.vision.out_hidden_size == hidden and cfg.torch_dtype == "bfloat16"
    assert (path / "tokenizer.json").is_file() and (path / "preprocessor_config.json").is_file()
    assert json.loads((path / "generation_config.json").read_text()).keys() == {
        "eos_token_id",
        "pad_token_id",
    }


def _seq(row: int, n: int, start: int, sample: bool = True) -> SeqInputs:
    ids = [] if n == 0 else list(range(100, 100 + n))
    count = n or 1
    pos = np.tile(np.arange(start, start + count), (3, 1))
    return SeqInputs(row, ids, pos, np.arange(start, start + count) + 1000 * row, start + count, sample)


def test_step_inputs_sections_are_aligned_and_round_trip():
    seqs = [_seq(3, 7, 0), _seq(5, 0, 41), _seq(0, 3, 10, sample=False)]
    updates = Updates([17, 18, 19], [4, 5, 6], [5], [99])
    inputs = StepInputs(seqs, updates)
    views = inputs.to_device(torch.device("cpu"))
    for name, (offset, _) in inputs.sections.items():
        assert offset % ALIGN == 0, name
    assert views["ids"].tolist() == [*range(100, 107), 0, 100, 101, 102]
    assert views["src_rows"].tolist() == [-1] * 7 + [5] + [-1] * 3  # the decode token comes from row 5
    assert views["positions"].view(3, -1)[1].tolist() == [*range(7), 41, 10, 11, 12]
    assert views["rows"].tolist() == [3, 5, 0] and views["seq_lens"].tolist() == [7, 42, 13]
    assert views["q_start"].tolist() == [0, 7, 8] and views["q_lens"].tolist() == [7, 1, 3]
    assert views["sample_idx"].tolist() == [6, 7] and views["sample_rows"].tolist() == [3, 5]
    assert views["table_cells"].tolist() == [17, 18, 19] and views["token_ids"].tolist() == [99]


def test_graph_layout_pads_and_matches_the_graph_views():
    seqs = [_seq(7, 0, 20), _seq(2, 0, 9)]
    inputs = StepInputs(seqs, Updates([1], [2]), graph_size=6)
    static = torch.full((graph_buffer_size(8),), -7, dtype=torch.int32)
    views = inputs.to_device(torch.device("cpu"), static)
    g = graph_views(static, 6)
    assert g["src_rows"].tolist() == [7, 2, 0, 0, 0, 0]
    assert g["seq_lens"].tolist() == [21, 10, 0, 0, 0, 0]  # padding rows: length 0, slot 0 of page 0
    assert g["slots"].tolist() == [7020, 2009, 0, 0, 0, 0]
    assert g["positions"].view(3, 6)[2].tolist() == [20, 9, 0, 0, 0, 0]
    assert views["table_cells"].tolist() == [1] and views["table_pages"].tolist() == [2]


def test_capture_sizes_cover_every_batch():
    for max_bs in (1, 3, 64, 100, 256, 300):
        sizes = capture_sizes(max_bs)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_bs and sizes[0] == 1
        assert all(b - a <= 64 for a, b in zip(sizes, sizes[1:], strict=False))


def test_kv_budget_leaves_room_for_activations_graphs_and_vision():
    gb = 1 << 30
    budget = memory.GpuBudget(total=80 * gb, weights=16 * gb, activations=3 * gb, graphs=1 * gb, vision=6 * gb,
                              free=63 * gb)  # fmt: skip
    # 0.85 * 80 - 16 = 52 GB, and 80 - 6 - 1 - 3 - 1 - 16 = 53 GB outside it: the fraction decides
    assert budget.kv_bytes(0.85) == int(80 * gb * 0.85) - 16 * gb
    # a fraction that would squeeze the activations is cut back to what fits
    assert budget.kv_bytes(0.95) == 53 * gb
    # another process holding memory: only what is free
    crowded = memory.GpuBudget(80 * gb, 16 * gb, 3 * gb, 1 * gb, 6 * gb, free=40 * gb)
    assert crowded.kv_bytes(0.85) == 40 * gb - 4 * gb - memory.CONTEXT_RESERVE // 2
    with pytest.raises(ValueError, match="mem-fraction-static"):
        memory.gpu_num_pages(memory.GpuBudget(80 * gb, 70 * gb, 3 * gb, gb, 6 * gb, 9 * gb), 0.85, 1 << 20)


def test_piecewise_token_sizes_cover_every_count_up_to_the_maximum():
    assert token_sizes(0) == []
    assert token_sizes(8) == [8]
    assert token_sizes(100) == [8, 16, 32, 48, 64, 96, 100]
    big = token_sizes(2048)
    assert big[-1] == 2048 and big == sorted(set(big))
    assert big[big.index(1024) + 1 :] == [1280, 1536, 1792, 2048]
    # every count from 1 to the maximum has a bucket; past 256 tokens (where a step stops being bound by reading
    # the weights) padding adds under a quarter
    for n in range(1, 2049):
        t = next(s for s in big if s >= n)
        assert n <= t and (n <= 256 or t / n < 1.25)


def test_a_bad_sequence_fails_alone_and_the_others_run(default_model):
    """Inputs from the scheduler are checked per sequence: ids past the vocabulary, page ids outside the cache and
    an image span that does not fit its grid each fail their own sequence; the step runs the rest (issue 10)."""
    from common.types import MultimodalItem, SamplingParams, SeqInit, SeqStep, StepPlan
    from worker_svc.model_runner import ModelRunner, RunnerConfig

    runner = ModelRunner(
        RunnerConfig(
            str(default_model), device="cpu", page_size=4, max_total_tokens=512, max_running_requests=8
        ),
        None,
    )
    vocab = runner.model_config.text.vocab_size
    greedy = SamplingParams(temperature=0.0)

    def seq(sid: str, ids, pages, items=(), bias=None):
        params = SamplingParams(temperature=0.0, logit_bias=bias or {}) if bias else greedy
        return SeqStep(sid, 0, tuple(ids), True, 0, tuple(pages), SeqInit(tuple(items), params, len(ids)))

    zero_grid = MultimodalItem("img", 1, 4, (1, 0, 8))  # h = 0: a ZeroDivisionError in the rotary positions
    plan = StepPlan(1, (
        seq("good", [11, 12, 13, 14, 15], [1, 2]),
        seq("big-id", [11, vocab], [3, 4]),
        seq("bad-page", [11, 12], [runner.kv_cache.num_pages]),
        seq("bad-grid", [11, 12, 12, 12, 12, 13], [5, 6], [zero_grid]),
        seq("bad-bias", [11, 12], [7], bias={vocab + 5: 1.0}),
    ))  # fmt: skip
    out = runner.step(plan)
    assert [r.seq_id for r in out.results] == ["good"]
    assert sorted(f.seq_id for f in out.failures) == ["bad-bias", "bad-grid", "bad-page", "big-id"]
    # the good sequence goes on decoding; the failed ones stay failed until re-initialized
    nxt = runner.step(StepPlan(2, (SeqStep("good", 5, (), True), SeqStep("big-id", 2, (), True))))
    assert [r.seq_id for r in nxt.results] == ["good"] and [f.seq_id for f in nxt.failures] == ["big-id"]
    # an embedding cached under the image's key with another row count is not this image's: that sequence fails
    hidden = runner.model_config.text.hidden_size
    runner.embeddings.put("short", torch.zeros(3, hidden, dtype=runner.dtype))
    item = MultimodalItem("short", 1, 8, (1, 4, 8))
    out = runner.step(StepPlan(3, (seq("wrong-rows", [11, *[12] * 8, 13], [8, 9, 10], [item]),)))
    assert not out.results and [f.seq_id for f in out.failures] == ["wrong-rows"]
