"""benchmarks.compare's arithmetic: ratios within a round, medians over rounds."""
from benchmarks.compare import median_of, ratios_of


def _round(scale_ours: float, scale_theirs: float) -> dict:
    m = lambda p, g: {"prompt_tok_s": p, "generate_tok_s": g, "weight_bytes_per_token": 1e9,  # noqa: E731
                      "kernels": "vnni"}
    return {"stream_gb_s": {"1": 20.0, "2": 30.0},
            "mpillm": {"1": m(100 * scale_ours, 10 * scale_ours), "2": m(180 * scale_ours, 18 * scale_ours)},
            "llama_cpp": {"1": m(90 * scale_theirs, 9 * scale_theirs), "2": m(150 * scale_theirs, 15 * scale_theirs)}}


def test_ratios_use_one_round():
    r = ratios_of(_round(1.0, 1.0))
    assert abs(r["generate_np2_over_llamacpp_2t"] - 18 / 15) < 1e-12
    assert abs(r["prompt_np1_over_llamacpp_1t"] - 100 / 90) < 1e-12
    assert abs(r["scaling_generate_np2_over_np1"] - 1.8) < 1e-12
    assert abs(r["np2_weight_bw_over_stream2"] - 18 / 30) < 1e-12
    # a slow minute that hits both engines leaves the ratio alone
    assert abs(ratios_of(_round(0.5, 0.5))["generate_np2_over_llamacpp_2t"] - 18 / 15) < 1e-12


def test_median_over_rounds_and_fields_kept():
    rounds = [_round(s, 1.0) for s in (1.0, 3.0, 2.0)]
    med = median_of(rounds)
    assert med["mpillm"]["2"]["generate_tok_s"] == 36.0  # median of 18, 54, 36
    assert med["llama_cpp"]["1"]["prompt_tok_s"] == 90.0
    assert med["mpillm"]["1"]["kernels"] == "vnni"
    assert med["stream_gb_s"] == {"1": 20.0, "2": 30.0}


def test_without_llamacpp_only_own_ratios():
    r = _round(1.0, 1.0)
    r["llama_cpp"] = {}
    assert "generate_np2_over_llamacpp_2t" not in ratios_of(r)
    assert "scaling_prompt_np2_over_np1" in ratios_of(r)
