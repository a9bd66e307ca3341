"""The fast vision tower (fused ops, metadata built once, padded forward, still-image layout, attention backends,
CUDA-graph buckets) against Hugging Face's tower and our torch references; the vision Triton kernels against their
references (through Triton's interpreter without a GPU). The `gpu` tests at the end need CUDA.

The tower here has head_dim 80 (as Qwen2.5-VL-7B's), so kernels see a non-power-of-2 head_dim, and a 2-frame grid.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from kernels import vision as kv
from kernels._triton import INTERPRET, triton_testable
from mirador.default_model import config_with
from models.loader import checkpoint_shapes, load_model
from models.qwen2_5_vl_vision import PaddedShape, Qwen2_5_VisionTransformer, build_vision_metadata
from processor.model_config import parse_config
from vision_svc.graphs import VisionGraphs

needs_triton = pytest.mark.skipif(not triton_testable(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")
# the CPU tower through Triton kernels: the interpreter only (on a GPU machine the CUDA tests cover it)
needs_interpreter = pytest.mark.skipif(
    not (INTERPRET and triton_testable()), reason="needs TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RAW = config_with(
    vision_depth=4,
    vision_hidden_size=160,
    vision_num_heads=2,
    vision_intermediate_size=96,
    vision_out_hidden_size=64,
    vision_fullatt_block_indexes=[1, 3],
)
CONFIG = parse_config(RAW)
VCFG = CONFIG.vision
# an image, a thin one (one row of windows), a 2-frame clip and one with partial windows on both sides
GRIDS = [(1, 16, 20), (1, 2, 34), (2, 6, 4), (1, 10, 10)]
SMALL_GRIDS = [(1, 8, 8), (1, 4, 12)]  # for the interpreter


def _pixels(grids, seed: int, still: bool = False) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    p = VCFG.patch_size
    width = VCFG.in_channels * p * p * (1 if still else VCFG.temporal_patch_size)
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5, atol: float | None = 1e-3) -> None:
    """Through a network: the relative error norm under `rel` (a wrong window, angle or order gives ~1e-1) and,
    for float32, no element off by more than `atol` of the largest magnitude (BLAS blocking wobbles)."""
    assert ours.shape == ref.shape
    err = float((ours.float() - ref.float()).norm() / ref.float().norm())
    assert err < rel, err
    if atol is not None:
        torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=atol * float(ref.abs().max()))


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """HF's tower with random weights (norms too), and ours loaded from its checkpoint through the loader."""
    torch.manual_seed(0)
    hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        Qwen2_5_VLVisionConfig(**RAW["vision_config"]), attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(
                torch.randn_like(p) * (0.1 if name.endswith("bias") else 1.0 / max(1, p[0].numel()) ** 0.5)
            )
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "ln_q" in name:
                p.add_(1.0)
    ckpt = tmp_path_factory.mktemp("vision80")
    save_file(
        {f"visual.{k}": v.contiguous() for k, v in hf.state_dict().items()}, str(ckpt / "model.safetensors")
    )
    ours = load_model(Qwen2_5_VisionTransformer, CONFIG, ckpt, torch.float32, torch.device("cpu"))
    return hf, ours, ckpt


# ---- metadata --------------------------------------------------------------------------------------------------


def test_metadata_matches_hf_helpers():
    hf_utils = pytest.importorskip("transformers.vision_utils")  # transformers >= 5.2x
    get_vision_window_index = hf_utils.get_vision_window_index
    get_vision_cu_seqlens, get_vision_position_ids = (
        hf_utils.get_vision_cu_seqlens,
        hf_utils.get_vision_position_ids,
    )
    meta = build_vision_metadata(GRIDS, VCFG, "cpu")
    grid_thw = torch.tensor(GRIDS)
    order, cu_window = get_vision_window_index(grid_thw, 2, VCFG.window_size, VCFG.patch_size)
    assert meta.unit_order.tolist() == order.tolist()
    assert meta.unit_inverse.tolist() == torch.argsort(order).tolist()
    assert list(meta.window.bounds) == cu_window.tolist() == meta.window.cu_seqlens.tolist()
    assert list(meta.full.bounds) == get_vision_cu_seqlens(grid_thw).tolist()
    pos = get_vision_position_ids(grid_thw, 2)
    assert torch.equal(meta.positions.long(), pos.view(-1, 4, 2)[order].reshape(-1, 2))
    assert meta.window.max_len == 64 and meta.full.max_len == 320
    assert meta.num_patches == meta.num_rows == pos.shape[0] and meta.num_tokens == pos.shape[0] // 4
    assert meta.packed.dtype == torch.int32 and meta.unit_order.data_ptr() == meta.packed.data_ptr()


def test_padded_metadata_pads_with_own_segments():
    shape = PaddedShape.for_rows(VCFG, 1024, max_frames=8)
    meta = build_vision_metadata(GRIDS, VCFG, "cpu", shape)
    real = build_vision_metadata(GRIDS, VCFG, "cpu")
    n, units = real.num_rows, real.num_rows // 4
    assert meta.num_rows == 1024 and meta.num_patches == n and meta.num_tokens == real.num_tokens
    assert meta.unit_order[:units].tolist() == real.unit_order.tolist()
    assert meta.unit_order[units:].tolist() == list(range(units, 256))
    assert torch.equal(meta.positions[:n], real.positions) and not meta.positions[n:].any()
    w = np.array(meta.window.bounds)
    assert len(w) == shape.window_segments + 1 and w[-1] == 1024
    assert (np.diff(w) <= shape.max_window).all() and list(w[: len(real.window.bounds)]) == list(
        real.window.bounds
    )
    assert list(meta.full.bounds[: len(real.full.bounds) + 1]) == [*real.full.bounds, 1024]
    assert meta.window.max_len == shape.max_window and meta.full.max_len == 1024
    # the same shape gives the same buffer layout whatever the grids
    again = build_vision_metadata([(1, 2, 2)], VCFG, "cpu", shape, out=meta.packed.clone())
    assert again.packed.shape == meta.packed.shape and again.num_patches == 4


def test_padded_capacity_holds_any_batch_that_fits():
    rng = random.Random(0)
    for rows in (64, 256, 1024):
        for max_frames in (1, 3, 16):
            shape = PaddedShape.for_rows(VCFG, rows, max_frames)
            for _ in range(40):
                grids, left, frames = [], rows, 0
                while frames < max_frames and left >= 4:
                    t = rng.choice([1, 1, 2]) if max_frames - frames >= 2 else 1
                    h = 2 * rng.randint(1, 20)
                    w = 2 * rng.randint(1, max(1, min(40, left // (t * h) // 2)))
                    if t * h * w > left:
                        break
                    grids.append((t, h, w))
                    left, frames = left - t * h * w, frames + t
                meta = build_vision_metadata(grids, VCFG, "cpu", shape)  # raises if a capacity is short
                assert meta.window.bounds[-1] == rows and meta.full.bounds[-1] == rows
    shape = PaddedShape.for_rows(VCFG, 64, max_frames=1)
    with pytest.raises(ValueError):
        build_vision_metadata([(1, 2, 2), (1, 2, 2)], VCFG, "cpu", shape)  # two frames
    with pytest.raises(ValueError):
        build_vision_metadata([(1, 8, 10)], VCFG, "cpu", shape)  # 80 patches


# ---- the tower on the CPU --------------------------------------------------------------------------------------


def test_checkpoint_names_are_hf_names(towers):
    hf, ours, ckpt = towers
    with torch.device("meta"):
        names = checkpoint_shapes(Qwen2_5_VisionTransformer(CONFIG))
    assert names == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mlp = ours.blocks[0].mlp
    assert torch.equal(mlp.gate_up_proj.weight[: VCFG.intermediate_size], hf.blocks[0].mlp.gate_proj.weight)
    half = mlp.gate_up_proj.weight.shape[0] // 2  # the intermediate width padded to a multiple of 64
    assert half % 64 == 0 and half >= VCFG.intermediate_size
    up = mlp.gate_up_proj.bias[half : half + VCFG.intermediate_size]
    assert torch.equal(up, hf.blocks[0].mlp.up_proj.bias)
    dummy = load_model(Qwen2_5_VisionTransformer, CONFIG, ckpt, torch.float32, torch.device("cpu"), "dummy")
    with torch.no_grad():
        assert torch.isfinite(dummy(_pixels(SMALL_GRIDS, 0), SMALL_GRIDS)).all()


def test_forward_equals_hf(towers):
    hf, ours, _ = towers
    pixels = _pixels(GRIDS, 1)
    with torch.no_grad():
        ref = hf(pixels, grid_thw=torch.tensor(GRIDS)).pooler_output
        out = ours(pixels, GRIDS)
    _close(out, ref)


def test_padded_forward_equals_unpadded_on_real_rows(towers):
    _, ours, _ = towers
    pixels = _pixels(GRIDS, 2)
    meta = build_vision_metadata(GRIDS, VCFG, "cpu", PaddedShape.for_rows(VCFG, 1024, 8))
    with torch.no_grad():
        ref = ours(pixels, GRIDS)
        outs = []
        for seed in (3, 4):  # different padding contents leave the real rows alone
            padded = torch.cat([pixels, 5 * torch.randn(1024 - pixels.shape[0], pixels.shape[1])])
            torch.manual_seed(seed)
            outs.append(ours.forward_padded(padded, meta))
    assert outs[0].shape == (256, VCFG.out_hidden_size)
    _close(outs[0][: meta.num_tokens], ref)
    assert torch.equal(outs[0][: meta.num_tokens], outs[1][: meta.num_tokens])


def test_still_image_layout_equals_repeated_frames(towers):
    _, ours, _ = towers
    grids = [(1, 16, 20), (1, 10, 10)]
    still = _pixels(grids, 5, still=True)
    n, c, t = still.shape[0], VCFG.in_channels, VCFG.temporal_patch_size
    frames = still.view(n, c, 1, -1).expand(n, c, t, still.shape[1] // c).reshape(n, -1)
    with torch.no_grad():
        _close(ours(still, grids), ours(frames, grids))
        with pytest.raises(ValueError):
            ours(frames[:, :100], grids)


# ---- attention backends ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "requested,device,dtype,varlen,triton,interpret,want",
    [
        ("auto", "cuda", torch.bfloat16, True, True, False, "varlen"),
        ("auto", "cuda", torch.float16, True, False, False, "varlen"),
        ("auto", "cuda", torch.float32, True, True, False, "triton"),  # flash has no fp32
        ("auto", "cuda", torch.bfloat16, False, True, False, "triton"),
        ("auto", "cuda", torch.bfloat16, False, False, False, "torch_native"),
        ("auto", "cpu", torch.float32, True, True, True, "torch_native"),  # the interpreter is for tests only
        ("triton", "cpu", torch.float32, False, True, True, "triton"),
        ("torch_native", "cuda", torch.bfloat16, True, True, False, "torch_native"),
        ("varlen", "cpu", torch.bfloat16, True, True, False, None),
        ("varlen", "cuda", torch.float32, True, True, False, None),
        ("triton", "cpu", torch.float32, False, True, False, None),
        ("flash3", "cuda", torch.bfloat16, True, True, False, None),
        ("fa4", "cuda", torch.bfloat16, True, True, False, None),  # flash-attn-4 absent
    ],
)
def test_pick_vision_attention(requested, device, dtype, varlen, triton, interpret, want):
    def pick():
        return kv.pick_vision_attention(
            requested, device, dtype, has_varlen=varlen, has_triton=triton, interpret=interpret
        )

    if want is None:
        with pytest.raises(ValueError):
            pick()
    else:
        assert pick() == want


@pytest.mark.parametrize(
    "requested,dtype,device,varlen,want",
    [
        ("auto", torch.bfloat16, "cuda", True, "fa4"),
        ("auto", torch.float16, "cuda", True, "fa4"),
        ("auto", torch.float32, "cuda", True, "triton"),  # flash-attn-4 serves fp16/bf16 only
        ("auto", torch.bfloat16, "cuda", False, "triton"),  # its short segments go to flash varlen
        ("auto", torch.bfloat16, "cpu", True, "torch_native"),
        ("fa4", torch.bfloat16, "cuda", True, "fa4"),
        ("varlen", torch.bfloat16, "cuda", True, "varlen"),
        ("fa4", torch.float32, "cuda", True, None),
    ],
)
def test_auto_takes_fa4_where_flash_attn_4_runs(requested, dtype, device, varlen, want):
    def pick():
        return kv.pick_vision_attention(
            requested, device, dtype, has_varlen=varlen, has_triton=True, interpret=False, has_fa4=True
        )

    if want is None:
        with pytest.raises(ValueError):
            pick()
    else:
        assert pick() == want


def test_fa4_backend_sends_short_segments_and_other_head_dims_to_varlen(monkeypatch):
    """flash-attn-4 takes whole images (segments that can reach FA4_MIN_SEGMENT rows) at the head_dims it was
    measured at; windows-sized segments and other towers' head_dims (SigLIP's 72) stay on cuDNN / flash varlen."""
    calls = []
    monkeypatch.setattr(kv, "varlen_attention_flash", lambda q, k, v, seg, scale: calls.append("varlen") or q)
    monkeypatch.setattr(kv, "_fa4_varlen", lambda: lambda q, *a, **kw: calls.append("fa4") or q)
    long, short = _segments([kv.FA4_MIN_SEGMENT, 10]), _segments([64, 64])
    for head_dim, seg, want in ((80, long, "fa4"), (80, short, "varlen"), (72, long, "varlen")):
        q = torch.zeros(seg.bounds[-1], 2, head_dim)
        kv.varlen_attention_fa4(q, q, q, seg, 1.0)
        assert calls.pop() == want


def test_asking_for_fa4_without_flash_attn_4_says_how_to_get_it():
    with pytest.raises(ValueError, match=r"mirador\[gpu\]"):
        kv.pick_vision_attention(
            "fa4", "cuda", torch.bfloat16, has_varlen=True, has_triton=True, interpret=False, has_fa4=False
        )


def test_varlen_backend_is_not_offered_on_cpu(towers):
    _, ours, _ = towers
    assert kv.resolve_vision_attention("auto", torch.device("cpu"), torch.bfloat16) == "torch_native"
    with pytest.raises(ValueError):
        ours.set_attention_backend("varlen")
    assert ours.attention_backend == "auto"


def test_tile_table_covers_every_row_once():
    cu = np.array([0, 5, 69, 199, 199, 200, 217])
    tiles = kv.tile_table(cu, 64, capacity=12)
    covered = []
    for seg, first in tiles.tolist():
        lo, hi = cu[seg] + first, cu[seg + 1]
        covered.extend(range(lo, min(hi, lo + 64)))
    assert sorted(covered) == list(range(217))
    assert tiles.shape == (12, 2) and (tiles[7:, 1] >= 1 << 30).all()
    with pytest.raises(ValueError):
        kv.tile_table(cu, 64, capacity=6)


# ---- Triton kernels (interpreter without a GPU) ----------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(n: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, heads, head_dim, generator=g).to(DEVICE, dtype)  # unbind(1): strided views


def _cos_sin(n: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(n, head_dim // 2, generator=g) * 40
    emb = torch.cat([angles, angles], -1).to(DEVICE)
    return emb.cos(), emb.sin()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,head_dim", [(3, 80), (2, 16)])
def test_rotary_triton_matches_reference(dtype, heads, head_dim):
    qkv = _qkv(9, heads, head_dim, dtype, 0)
    ref = qkv.clone()
    cos, sin = _cos_sin(9, head_dim, 1)
    kv.apply_vision_rotary_triton(*qkv.unbind(1)[:2], cos, sin)
    kv.apply_vision_rotary_ref(*ref.unbind(1)[:2], cos, sin)
    assert torch.equal(qkv[:, 2], ref[:, 2])  # v untouched
    if dtype == torch.float32:
        torch.testing.assert_close(qkv, ref, rtol=1e-5, atol=1e-6)
    else:  # float32 arithmetic, one rounding: at most an ulp apart where an FMA rounds differently
        torch.testing.assert_close(qkv.float(), ref.float(), rtol=8e-3, atol=1e-5)
        assert (qkv == ref).float().mean() > 0.99


def _segments(lengths: list[int], capacity: int | None = None) -> kv.Segments:
    cu = np.concatenate([[0], np.cumsum(lengths)])
    tiles = kv.tile_table(cu, kv.ATTN_BLOCK_M, capacity)
    return kv.Segments(
        torch.tensor(cu, dtype=torch.int32, device=DEVICE),
        max(lengths),
        tuple(cu.tolist()),
        torch.tensor(tiles, device=DEVICE),
    )


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity", [None, 16], ids=["exact", "padded_tiles"])
def test_varlen_attention_triton_matches_reference(dtype, capacity):
    seg = _segments([5, 64, 130, 0, 1, 17], capacity)
    q, k, v = _qkv(217, 2, 80, dtype, 2).unbind(1)
    out = kv.varlen_attention_triton(q, k, v, seg, 80**-0.5)
    ref = kv.varlen_attention_ref(q.float(), k.float(), v.float(), seg, 80**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity", [None, 16], ids=["exact", "padded_tiles"])
@pytest.mark.parametrize("heads,head_dim", [(2, 80), (3, 16)])
def test_rotary_attention_triton_matches_rotary_then_reference(dtype, capacity, heads, head_dim):
    # windows of one tile, one longer than two tiles (keys rotated per key block), empty and one-row segments
    seg = _segments([5, 64, 130, 0, 1, 17], capacity)
    qkv = _qkv(217, heads, head_dim, dtype, 4)
    q, k, v = qkv.unbind(1)
    cos, sin = _cos_sin(217, head_dim, 5)
    before = qkv.clone()
    out = kv.rotary_varlen_attention_triton(q, k, v, cos, sin, seg, head_dim**-0.5)
    assert torch.equal(qkv, before)  # q and k are rotated in registers, not in place
    rq, rk, rv = before.clone().unbind(1)
    ref = kv.rotary_varlen_attention_ref(rq, rk, rv, cos, sin, seg, head_dim**-0.5)  # rotary in the dtype
    rq_, rk_ = rq.float(), rk.float()
    ref32 = kv.varlen_attention_ref(rq_, rk_, rv.float(), seg, head_dim**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref32, rtol=tol, atol=tol)
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_backends_rotate_before_attention_for_long_segments():
    # the fused kernel serves short segments only; long ones (a whole image) take the rotary pass + forward
    for name, backend in kv.VISION_ATTENTION_BACKENDS.items():
        long = backend.with_rotary(False)
        assert long is not backend.fused_rotary
        if backend.fused_rotary is not None:
            assert backend.with_rotary(True) is backend.fused_rotary
        if name == "torch_native":
            assert backend.fused_rotary is None


@needs_interpreter
def test_tower_with_triton_attention_matches_torch_native(towers):
    _, ours, _ = towers
    pixels = _pixels(SMALL_GRIDS, 6)
    meta = build_vision_metadata(SMALL_GRIDS, VCFG, "cpu", PaddedShape.for_rows(VCFG, 192, 4))
    padded = torch.cat([pixels, torch.randn(192 - pixels.shape[0], pixels.shape[1])])
    try:
        with torch.no_grad():
            ref = ours(pixels, SMALL_GRIDS)
            ours.set_attention_backend("triton")
            out = ours(pixels, SMALL_GRIDS)
            out_padded = ours.forward_padded(padded, meta)[: meta.num_tokens]
    finally:
        ours.set_attention_backend("auto")
    _close(out, ref)
    _close(out_padded, ref)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# what a CUDA graph cannot hold: reading a device value on the host, data-dependent shapes, host-made tensors
HOST_WORK = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique_consecutive", "lift_fresh"}


@needs_interpreter
def test_padded_forward_does_no_host_work_with_graph_safe_attention(towers):
    _, ours, _ = towers
    pixels = _pixels(SMALL_GRIDS, 10)
    meta = build_vision_metadata(SMALL_GRIDS, VCFG, "cpu", PaddedShape.for_rows(VCFG, 128, 2))
    padded = torch.cat([pixels, torch.zeros(128 - pixels.shape[0], pixels.shape[1])])
    recorded = {}
    try:
        for backend in ("torch_native", "triton"):
            ours.set_attention_backend(backend)
            with torch.no_grad(), _RecordOps() as rec:
                ours.forward_padded(padded, meta)
            recorded[backend] = rec.ops & HOST_WORK
    finally:
        ours.set_attention_backend("auto")
    assert recorded["torch_native"]  # the reference builds index tensors on the host: the check sees it
    assert not recorded["triton"], recorded["triton"]


# ---- graph buckets (eager on the CPU: the same padded path on the same static buffers) ------------------------


def test_vision_graphs_pad_into_buckets_and_fall_back(towers):
    _, ours, _ = towers
    graphs = VisionGraphs(ours, buckets=(128, 512), max_frames=4, still=False)
    assert graphs.bucket_for(100, 2, graphs.in_features) == 128
    assert graphs.bucket_for(128, 2, graphs.in_features) == 128
    assert graphs.bucket_for(129, 2, graphs.in_features) == 512
    assert graphs.bucket_for(513, 1, graphs.in_features) is None
    assert graphs.bucket_for(100, 5, graphs.in_features) is None
    assert graphs.bucket_for(100, 1, graphs.in_features // 2) is None
    with torch.no_grad():
        for grids in ([(1, 16, 20)], [(1, 2, 34), (2, 6, 4), (1, 10, 10)], GRIDS, [(1, 2, 2)]):
            pixels = _pixels(grids, 7)
            _close(graphs.run(pixels, grids), ours(pixels, grids))
    with pytest.raises(RuntimeError):
        graphs.capture()


def test_vision_graphs_take_still_images(towers):
    _, ours, _ = towers
    graphs = VisionGraphs(ours, buckets=(512,), max_frames=2)
    grids = [(1, 16, 20)]
    still = _pixels(grids, 8, still=True)
    with torch.no_grad():
        _close(graphs.run(still, grids), ours(still, grids))
        assert graphs.bucket_for(still.shape[0], 1, still.shape[1]) == 512


def _record_errors(fn, errors: list):
    def call(*args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported by the test's thread
            errors.append(e)

    return call


class _FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: replay re-runs the forward it recorded."""

    def __init__(self, run):
        self.run, self.replays = run, 0

    def replay(self):
        self.replays += 1
        self.run()


def test_large_batches_are_captured_at_their_exact_shape_on_the_second_sighting(towers, monkeypatch):
    _, ours, _ = towers
    graphs = VisionGraphs(ours, buckets=(128,), max_frames=4, still=False, max_shapes=2)
    captured = []

    def fake_capture(pixels, meta):
        out = torch.empty(meta.num_tokens, ours.merger.mlp[2].out_features)

        def run():
            out.copy_(ours.forward_padded(pixels, meta))

        captured.append((pixels, meta))
        return _FakeGraph(run), out, ours.forward_padded(pixels, meta)

    monkeypatch.setattr(graphs, "_capture", fake_capture)
    graphs._pool = object()  # as after capture() on a GPU
    shapes = [[(1, 16, 20)], [(1, 2, 34), (1, 10, 10)], [(1, 12, 12)]]  # all past the 128-patch bucket
    with torch.no_grad():
        for i, grids in enumerate(
            [shapes[0], shapes[0], shapes[0], shapes[1], shapes[1], shapes[2], shapes[2]]
        ):
            pixels = _pixels(grids, 10 + i)
            out = graphs.run(pixels, grids)
            _close(out, ours(pixels, grids))  # a replay reads this call's pixels, not the captured ones
        # first sightings ran eagerly; second sightings captured; the third of shapes[0] replayed
        assert len(captured) == 3
        keys = [k[1] for k in graphs.shapes]
        assert keys == [tuple(shapes[1]), tuple(shapes[2])]  # LRU: shapes[0] evicted at max_shapes=2
        assert graphs.graphed(shapes[2], 144, graphs.in_features)
        assert not graphs.graphed(shapes[0], 320, graphs.in_features)
        assert graphs.graphed([(1, 8, 8)], 64, graphs.in_features)  # a bucket
    # a capture that fails leaves the batch eager and stops further captures
    graphs = VisionGraphs(ours, buckets=(128,), max_frames=4, still=False, max_shapes=2)
    graphs._pool = object()

    def broken(pixels, meta):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", broken)
    grids = shapes[0]
    with torch.no_grad():
        for i in range(3):
            pixels = _pixels(grids, 20 + i)
            _close(graphs.run(pixels, grids), ours(pixels, grids))
    assert graphs.max_shapes == 0 and not graphs.shapes


# ---- on CUDA ---------------------------------------------------------------------------------------------------


def _window_and_full(n_full: int) -> tuple[kv.Segments, kv.Segments]:
    windows = [64] * (n_full // 64 - 1) + [40, 24]
    return _segments(windows), _segments([n_full // 2, n_full - n_full // 2])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["varlen", "triton"])
def test_cuda_attention_backends_match_reference_bf16(backend):
    if backend == "varlen" and not kv.HAS_VARLEN:
        pytest.skip("this torch has no varlen_attn")
    fn = kv.VISION_ATTENTION_BACKENDS[backend].forward
    q, k, v = _qkv(2048, 16, 80, torch.bfloat16, 3).unbind(1)
    for seg in _window_and_full(2048):
        out = fn(q, k, v, seg, 80**-0.5)
        ref = kv.varlen_attention_ref(q.float(), k.float(), v.float(), seg, 80**-0.5)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    # with the rotary: the fused kernel (windows) and the rotary pass + forward (whole images)
    cos, sin = _cos_sin(2048, 80, 6)
    qkv = _qkv(2048, 16, 80, torch.bfloat16, 7)
    for seg, short in zip(_window_and_full(2048), (True, False), strict=True):
        q, k, v = qkv.clone().unbind(1)
        out = kv.VISION_ATTENTION_BACKENDS[backend].with_rotary(short)(q, k, v, cos, sin, seg, 80**-0.5)
        rq, rk, rv = qkv.clone().unbind(1)
        kv.apply_vision_rotary_ref(rq, rk, cos, sin)
        ref = kv.varlen_attention_ref(rq.float(), rk.float(), rv.float(), seg, 80**-0.5)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fa4_matches_reference_on_whole_images_and_in_a_graph():
    """flash-attn-4 on segments long enough to take it (a photo's and a padding segment's worth), the rotary pass
    before it, and the same call replayed from a CUDA graph."""
    if not kv.fa4_usable(torch.device("cuda")):
        pytest.skip("flash-attn-4 is not installed or this GPU is older than Hopper")
    lengths = [kv.FA4_MIN_SEGMENT + 777, 3000, 0, 512]
    n = sum(lengths)
    seg = _segments(lengths)
    assert seg.max_len >= kv.FA4_MIN_SEGMENT
    qkv = _qkv(n, 16, 80, torch.bfloat16, 5)
    cos, sin = _cos_sin(n, 80, 6)
    rq, rk, rv = qkv.clone().unbind(1)
    kv.apply_vision_rotary_ref(rq, rk, cos, sin)
    ref = kv.varlen_attention_ref(rq.float(), rk.float(), rv.float(), seg, 80**-0.5)
    attend = kv.VISION_ATTENTION_BACKENDS["fa4"].with_rotary(False)
    q, k, v = qkv.clone().unbind(1)
    torch.testing.assert_close(attend(q, k, v, cos, sin, seg, 80**-0.5).float(), ref, rtol=2e-2, atol=2e-2)
    work = qkv.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = attend(*work.unbind(1), cos, sin, seg, 80**-0.5)
    work.copy_(qkv)
    graph.replay()
    torch.testing.assert_close(replayed.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_tower_fast_matches_reference(towers, dtype):
    hf, _, ckpt = towers
    fast = load_model(Qwen2_5_VisionTransformer, CONFIG, ckpt, dtype, torch.device("cuda"))
    backend = fast.set_attention_backend("auto")
    half = kv.HAS_VARLEN and dtype == torch.bfloat16
    assert backend == (("fa4" if kv.fa4_usable(torch.device("cuda")) else "varlen") if half else "triton")
    pixels = _pixels(GRIDS, 9)
    with torch.no_grad():
        ref = hf(pixels, grid_thw=torch.tensor(GRIDS)).pooler_output
        out = fast(pixels.cuda(), GRIDS).float().cpu()
        graphs = VisionGraphs(fast, buckets=(256, 1024), max_frames=8, still=False)
        graphs.capture()
        replayed = graphs.run(pixels, GRIDS).float().cpu()
        small = graphs.run(pixels[:320], GRIDS[:1]).float().cpu()
    if dtype == torch.float32:  # the padded replays run other GEMM shapes: float32 wobble only
        _close(out, ref, rel=1e-4)
        _close(replayed, out, rel=1e-5)
        _close(small, out[:80], rel=1e-5)
    else:  # bf16 roundings through 4 blocks; a wrong window or order would be ~1e-1
        _close(out, ref, rel=3e-2, atol=None)
        _close(replayed, out, rel=1e-2, atol=None)
        _close(small, out[:80], rel=1e-2, atol=None)


def test_still_patches_through_the_folded_aligned_kernel_match_the_conv():
    """Still-image patches [N, C*P*P] against the kernel folded over T once after loading, its columns padded to
    a 16-byte row (CUDA's default): equal to the conv over the frame repeated T times, and to the fold done per
    forward when nothing was folded."""
    from models.qwen2_5_vl_vision import Qwen2_5_VisionPatchEmbed

    torch.manual_seed(0)
    cfg = CONFIG.vision
    embed = Qwen2_5_VisionPatchEmbed(cfg)
    c, t, p = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
    still = torch.randn(5, c * p * p)
    frames = still.view(5, c, 1, p, p).expand(5, c, t, p, p)
    with torch.no_grad():
        conv = embed.proj(frames).flatten(1)
        per_forward = embed(still)
        embed.fold_still_kernel(align=8)
        assert embed.folded_still.shape == (cfg.hidden_size, -(-c * p * p // 8) * 8)
        aligned = embed(still)
    torch.testing.assert_close(per_forward, conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aligned, per_forward, rtol=1e-6, atol=1e-6)
    assert "folded_still" not in embed.state_dict()  # not a checkpoint tensor


def test_padding_the_intermediate_width_changes_nothing():
    from models.layers import MergedGatedMLP

    torch.manual_seed(0)
    mlp = MergedGatedMLP(32, 45, "silu", bias=True)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
        x = torch.randn(7, 32)
        ref = mlp(x)
        mlp.pad_intermediate(64)
        assert mlp.gate_up_proj.weight.shape == (128, 32) and mlp.down_proj.weight.shape == (32, 64)
        torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-4)  # float32 summation order only


@pytest.mark.gpu
@needs_cuda
def test_cuda_exact_shape_graph_replays_equal_eager(towers):
    _, _, ckpt = towers
    fast = load_model(Qwen2_5_VisionTransformer, CONFIG, ckpt, torch.bfloat16, torch.device("cuda"))
    fast.set_attention_backend("auto")
    graphs = VisionGraphs(fast, buckets=(256,), max_frames=8, still=False)
    graphs.capture()

    def run(seed: int) -> None:
        pixels = _pixels(GRIDS, seed).cuda().to(torch.bfloat16)
        with torch.no_grad():
            out = graphs.run(pixels, GRIDS)
            torch.testing.assert_close(out, fast(pixels, GRIDS), rtol=1e-2, atol=1e-2)

    # the first sighting on another thread (the vision service warms up on one thread and encodes on another:
    # cuBLAS and cuDNN keep per-thread state that must not be created during a capture)
    errors = []
    first = threading.Thread(target=_record_errors(run, errors), args=(11,))
    first.start()
    first.join()
    assert not errors, errors
    for seed in (12, 13, 14):  # eager + capture, then replays of new pixels
        run(seed)
    assert graphs.graphed(GRIDS, sum(t * h * w for t, h, w in GRIDS), graphs.in_features)
    assert graphs.max_shapes == 4, "the capture failed (see the log): the shape stayed eager"
