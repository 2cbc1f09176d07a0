"""Train/generate skew (issue 10): the ids a model saw in its own context before a response, as the data pipeline
really lays rows out, equal PromptLayout.apply(tok.encode(prompt)) for the layout train records in the run dir (what
`jaxtx generate --run` feeds the model). For packed causal documents this is checked through the model itself: the
logits of a document packed after another one equal the logits of the document fed alone with the layout."""
import jax
import numpy as np
import pytest
from train_helpers import run_cfg

import jaxtx.model
from jaxtx.run_dir import PromptLayout
from jaxtx.train import data as jdata
from jaxtx.train import packing
from jaxtx.train.sample import context_before_response, training_prompt_layout
from jaxtx.train.tokenizer import EOS


def _pipeline(objective):
    cfg = run_cfg([f"train.objective={objective}", "data.source=synthetic", "data.n_examples=120"])
    docs = jdata.read_documents(cfg)
    tok = jdata.get_tokenizer(cfg, cfg.model_config(), docs, None)
    return cfg, docs, tok, jdata.build_rows(docs, tok, cfg)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_prompt_response_rows_start_with_the_layout(objective):
    cfg, docs, tok, rows = _pipeline(objective)
    layout = training_prompt_layout(objective, EOS)
    assert layout == PromptLayout()
    resp_key = "response" if objective == "sft" else "chosen"
    for i, doc in enumerate(docs):
        want = layout.apply(tok.encode(doc["prompt"]))
        assert context_before_response(rows, i) == want, (doc, i)
        resp = tok.encode(doc[resp_key])
        assert rows["tokens"][i][len(want):len(want) + len(resp)].tolist() == resp  # the response follows directly
        if objective == "dpo":
            rej = {k[len("rejected_"):]: v for k, v in rows.items() if k.startswith("rejected_")}
            assert context_before_response(rej, i) == want


def test_packed_documents_are_seen_as_the_layout_lays_them_out():
    """Every document's own context starts at its first token: nothing of the previous document (its EOS included)
    is visible, and positions restart. Checked on the tokens and on the model's logits."""
    cfg, docs, tok, rows = _pipeline("causal")
    layout = training_prompt_layout("causal", EOS)
    assert layout == PromptLayout()
    ids = [tok.encode(d) for d in docs]
    # the packed stream is exactly layout.apply(doc) + [EOS] per document, and segment ids split it per document
    stream = [t for d in ids for t in layout.apply(d) + [EOS]]
    flat = rows["tokens"].reshape(-1)[:len(stream)]
    assert flat.tolist() == stream
    model_cfg = cfg.model_config()
    model = jaxtx.model.build(model_cfg)
    params = jaxtx.model.init_params(model, jax.random.key(0))
    tokens, seg = rows["tokens"][:4], rows["segment_ids"][:4]
    packed = np.asarray(model.apply({"params": params}, tokens, segment_ids=seg), np.float64)  # [B, T, V]
    checked = 0
    for r in range(tokens.shape[0]):
        starts = [t for t in range(1, tokens.shape[1]) if seg[r, t] != seg[r, t - 1] and seg[r, t] > 0]
        for t0 in starts:  # documents that begin mid-row, right after the previous document's EOS
            n = int((seg[r] == seg[r, t0]).sum())
            assert tokens[r, t0 - 1] == EOS
            alone = layout.apply(tokens[r, t0:t0 + n].tolist())
            ref = np.asarray(model.apply({"params": params}, np.asarray([alone], np.int32)), np.float64)[0]
            np.testing.assert_allclose(packed[r, t0:t0 + n], ref[len(layout.prefix):len(layout.prefix) + n],
                                       atol=2e-5, rtol=1e-5)
            checked += 1
    assert checked >= 4
    # and the EOS prefix `jaxtx generate` used before would have shown the model something it never saw
    with_eos = np.asarray(model.apply({"params": params}, np.asarray([[EOS] + alone], np.int32)), np.float64)[0]
    assert np.abs(with_eos[1:1 + n] - ref[:n]).max() > 1e-3


def test_span_encoder_inputs_end_with_the_layout_suffix():
    layout = training_prompt_layout("span", EOS)
    assert layout == PromptLayout(suffix=(EOS,))
    rng = np.random.default_rng(0)
    toks = np.arange(10, 40, dtype=np.int32)
    inputs, _ = packing.span_corrupt(toks, len(toks), np.arange(500, 600), 0.15, 3.0, rng)
    assert inputs[-len(layout.suffix):] == list(layout.suffix) and EOS not in inputs[:-1]
