"""Prompt log-probabilities (issue 11 item 3): SGLang's `logprob_start_len` on /generate (scoring with
max_new_tokens 0 included) and OpenAI's `echo` with `logprobs` on completions, through the real cluster, equal to
Hugging Face transformers' log-softmax of the same prompt. Prompts cross several prefill chunks and KV pages, and
the prefix cache must never serve a position whose log-probability is asked for."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest

from tests.helpers import SERVED, Cluster, HFReference, data_uri, noise_image, png_bytes

ATOL = 2e-4  # float32 on the CPU: chunked prefill vs one HF forward


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(
        default_model, "--page-size", "4", "--chunked-prefill-size", "8", log_dir=log_dir, name="prompt-lps"
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def hf(default_model):
    return HFReference(default_model)


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)


def _hf_scores(hf: HFReference, messages, images) -> tuple[list[int], list[list[float]]]:
    """HF's prompt ids and, per position i >= 1, the log-softmax row that predicts token i."""
    inputs = hf.inputs(messages, images)
    with hf.torch.no_grad():
        logits = hf.model(**inputs).logits[0].float()
    return inputs["input_ids"][0].tolist(), hf.torch.log_softmax(logits, dim=-1)


def _generate(cluster, **body) -> dict:
    r = cluster.http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _check_against_hf(ids, logp, meta, start: int, top: int) -> None:
    inputs, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert len(inputs) == len(tops) == len(ids) - start == meta["prompt_tokens"] - start
    for k, (entry, top_entry) in enumerate(zip(inputs, tops, strict=True)):
        pos = start + k
        assert entry[1] == ids[pos]
        if pos == 0:
            assert entry[0] is None and top_entry is None  # nothing predicts the first token
            continue
        row = logp[pos - 1]
        assert abs(entry[0] - float(row[ids[pos]])) < ATOL, f"position {pos}"
        assert len(top_entry) == top
        values, best = row.topk(top)
        assert [e[0] for e in top_entry] == pytest.approx(values.tolist(), abs=ATOL)
        gaps = (values[:-1] - values[1:]).tolist() + [1.0]
        for e, want, gap, before in zip(top_entry, best.tolist(), gaps, [1.0, *gaps[:-1]], strict=True):
            if gap > 1e-3 and before > 1e-3:  # ids of near-ties may swap; their values are checked above
                assert e[1] == want


@pytest.mark.parametrize("case", ["text", "image"])
def test_scoring_a_prompt_matches_hf(cluster, hf, case):
    """max_new_tokens 0 + logprob_start_len 0: SGLang's prompt scoring; every position against HF."""
    text = {"type": "text", "text": "Describe the picture in detail, please, with colours and shapes."}
    images = [noise_image(84, 56, 5)] if case == "image" else []
    messages = [{"role": "user", "content": [{"type": "image"}, text] if images else [text]}]
    ids, logp = _hf_scores(hf, messages, images)
    prompt = hf.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 3,
    }
    if images:
        body["image_data"] = data_uri(png_bytes(images[0]))
    out = _generate(cluster, **body)
    meta = out["meta_info"]
    assert len(ids) > 3 * 8  # several prefill chunks
    assert out["output_ids"] == [] and meta["completion_tokens"] == 0 and meta["output_token_logprobs"] == []
    assert meta["finish_reason"]["type"] == "length"
    _check_against_hf(ids, logp, meta, 0, 3)


def test_start_inside_the_prompt_is_not_served_from_the_cache(cluster, hf):
    """The same prompt cached by an earlier request: positions from logprob_start_len on are computed anyway,
    and their values equal a cold run's."""
    messages = [
        {"role": "user", "content": "Count the stars above the quiet harbour tonight, slowly and well."}
    ]
    ids, logp = _hf_scores(hf, messages, [])
    sp = {"max_new_tokens": 3, "temperature": 0}
    warm = _generate(cluster, input_ids=ids, sampling_params=sp)  # caches the prompt's pages
    again = _generate(cluster, input_ids=ids, sampling_params=sp)
    assert again["meta_info"]["cached_tokens"] >= len(ids) - 4
    for start in (1, 9, len(ids) - 1, len(ids)):
        out = _generate(
            cluster,
            input_ids=ids,
            sampling_params=sp,
            return_logprob=True,
            logprob_start_len=start,
            top_logprobs_num=2,
        )
        meta = out["meta_info"]
        assert out["output_ids"] == warm["output_ids"]
        assert meta["cached_tokens"] <= max(start - 1, 0)
        assert len(meta["output_token_logprobs"]) == 3
        _check_against_hf(ids, logp, meta, start, 2)


def test_output_logprobs_match_a_rescored_prompt(cluster):
    """SGLang's test_logprob_match: a greedy output's logprobs equal those of the same tokens scored as prompt."""
    prompt = "The old lighthouse keeper wrote in his journal that"
    out = _generate(
        cluster, text=prompt, sampling_params={"max_new_tokens": 8, "temperature": 0}, return_logprob=True
    )
    n_prompt = out["meta_info"]["prompt_tokens"]
    full = [e[1] for e in out["meta_info"]["output_token_logprobs"]]
    rescored = _generate(
        cluster,
        text=prompt,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=0,
    )
    prompt_ids = [e[1] for e in rescored["meta_info"]["input_token_logprobs"]]
    assert len(prompt_ids) == n_prompt
    again = _generate(
        cluster,
        input_ids=prompt_ids + full,
        sampling_params={"max_new_tokens": 0},
        return_logprob=True,
        logprob_start_len=n_prompt,
    )
    scored = again["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in scored] == full
    for a, b in zip(scored, out["meta_info"]["output_token_logprobs"], strict=True):
        assert abs(a[0] - b[0]) < 1e-3


def test_n_choices_and_batches_carry_the_prompt_logprobs(cluster):
    sp = {"max_new_tokens": 2, "temperature": 1.0, "n": 2}
    body = {"text": ["A short first prompt here", "and a second, longer prompt for the batch"]}
    outs = _generate(cluster, **body, sampling_params=sp, return_logprob=True, logprob_start_len=2)
    assert len(outs) == 4
    for k in (0, 2):
        a, b = outs[k]["meta_info"], outs[k + 1]["meta_info"]
        assert len(a["input_token_logprobs"]) == a["prompt_tokens"] - 2
        assert a["input_token_logprobs"] == b["input_token_logprobs"]  # choices share the prompt
    assert outs[0]["meta_info"]["input_token_logprobs"] != outs[2]["meta_info"]["input_token_logprobs"]


@pytest.mark.parametrize("n", [1, 2])
def test_echo_with_logprobs(client, cluster, n):
    """OpenAI / vLLM: the prompt's tokens first, the first one with null entries, then the completion's; text_offset
    runs on across them; streamed events reassemble to the same."""
    prompt = "Tell me about the rivers of the north and their fish"
    kw = {"model": SERVED, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 2, "n": n}
    r = client.completions.create(**kw, echo=True)
    plain = client.completions.create(**kw)
    scored = _generate(
        cluster, text=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0
    )["meta_info"]["input_token_logprobs"]
    n_prompt = len(scored)
    for c, p in zip(r.choices, plain.choices, strict=True):
        lp = c.logprobs
        assert c.text == prompt + p.text
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert len(lp.tokens) == n_prompt + len(p.logprobs.tokens)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(isinstance(v, float) and math.isfinite(v) for v in lp.token_logprobs[1:])
        assert lp.token_logprobs[1:n_prompt] == pytest.approx([e[0] for e in scored[1:]], abs=1e-5)
        assert lp.token_logprobs[n_prompt:] == pytest.approx(p.logprobs.token_logprobs, abs=1e-5)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert "".join(lp.tokens[:n_prompt]) == prompt
    streamed: dict[int, dict[str, list]] = {}
    for chunk in client.completions.create(**kw, echo=True, stream=True):
        for ch in chunk.choices:
            acc = streamed.setdefault(ch.index, {"tokens": [], "token_logprobs": [], "text_offset": []})
            if ch.logprobs is not None:
                for key in acc:
                    acc[key] += getattr(ch.logprobs, key)
    for c in r.choices:
        acc = streamed[c.index]
        assert acc["tokens"] == c.logprobs.tokens and acc["text_offset"] == c.logprobs.text_offset
        assert acc["token_logprobs"][0] is None
        assert acc["token_logprobs"][1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-5)


def test_rows_that_score_the_prompt():
    """Which rows of a chunk score which prompt token: row r of a chunk at `start` predicts position start + r + 1;
    positions before max(logprob_start_len, 1) and past the prompt are never asked."""
    from common.types import GenerateRequest, PromptLogprobs
    from scheduler_svc.sequence import RequestState

    ids = tuple(range(100, 110))  # a 10-token prompt
    state = RequestState(GenerateRequest("r", ids, logprob_start_len=3), 0.0, list(ids))
    assert state.needs_prompt_lps
    assert state.prompt_lp_rows(0, 2) == (0, ())  # rows 0, 1 predict positions 1, 2: before the start
    assert state.prompt_lp_rows(0, 4) == (2, (103, 104))
    assert state.prompt_lp_rows(4, 8) == (
        0,
        (105, 106, 107, 108, 109),
    )  # the last row samples, scores nothing
    state.add_prompt_lps(3, PromptLogprobs("r#0", (-1.0, -2.0)))
    assert state.needs_prompt_lps and state.prompt_logprobs() == []  # incomplete: nothing to hand out yet
    state.add_prompt_lps(5, PromptLogprobs("r#0", (-3.0, -4.0, -5.0, -6.0, -7.0)))
    assert not state.needs_prompt_lps and state.prompt_lp_rows(0, 10) == (0, ())
    assert [(e.token_id, e.logprob) for e in state.prompt_logprobs()] == [
        (103, -1.0),
        (104, -2.0),
        (105, -3.0),
        (106, -4.0),
        (107, -5.0),
        (108, -6.0),
        (109, -7.0),
    ]
    for start in (-1, 10, 11):  # none, or at or past the prompt's end: nothing to compute
        other = RequestState(GenerateRequest("r", ids, logprob_start_len=start), 0.0, list(ids))
        assert not other.needs_prompt_lps and other.prompt_lp_rows(0, 10) == (0, ())
    zero = RequestState(GenerateRequest("r", ids, logprob_start_len=0), 0.0, list(ids))
    assert zero.prompt_lp_rows(0, 3) == (0, (101, 102, 103))  # position 0 has none: row 0 scores position 1


def test_outputs_merged_for_a_caller_that_fell_behind_keep_the_prompt_logprobs():
    """A choice's first output carries the prompt's logprobs (echo); when the gateway's reader takes it together
    with the next output, the merged output still has them (they were dropped: the echoed prompt's tokens then
    went out without their logprobs, now and then, under load)."""
    from common.types import GenerateOutput, GenerateRequest, TokenLogprob
    from scheduler_svc.client import SchedulerClient
    from tests.helpers import free_port

    class Outbox:
        def __init__(self):
            self.sent = []

        def put_nowait(self, message):
            self.sent.append(message)

    async def run():
        client = SchedulerClient(f"127.0.0.1:{free_port()}")  # never dialled: the outbox below stands in
        client._outbox = Outbox()
        req = GenerateRequest(request_id="r1", input_ids=(1, 2, 3))
        stream = client.generate(req)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # the request is registered and waits for outputs
        prompt_lps = [TokenLogprob(2, -1.5), TokenLogprob(3, -0.5)]
        client._queues["r1"].put_nowait(GenerateOutput("r1", 0, "a", [7], prompt_logprobs=prompt_lps))
        client._queues["r1"].put_nowait(GenerateOutput("r1", 0, "b", [8], finish_reason="length"))
        out = await first
        await client.close()
        return out

    out = asyncio.run(run())
    assert out.text == "ab" and out.token_ids == [7, 8] and out.finish_reason == "length"
    assert out.prompt_logprobs == [TokenLogprob(2, -1.5), TokenLogprob(3, -0.5)]
