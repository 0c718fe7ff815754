"""eval.py: the Market-1501 protocol on hand-worked cases, against a plain loop, re-ranking, and the CLI."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import eval as evaluation
import verification
from datasets import load_eval_records
from metrics import evaluate_rank, pairwise_distance, protocol_masks
from model import build_trained
from rerank import re_ranking
from utils import UserError, save_torch, sha256_file

# ---------------------------------------------------------------------------------------------------------
# Hand-worked cases
# ---------------------------------------------------------------------------------------------------------

# Gallery: index: pid, camera.  g1 is query 0's same-camera match, g3 junk, g4 a distractor.
G_PIDS = np.array([2, 1, 1, -1, 0, 1, 3])
G_CAMS = np.array([2, 1, 2, 2, 3, 3, 2])
Q_PIDS = np.array([1, 2, 4, 3])
Q_CAMS = np.array([1, 1, 1, 2])
DIST = np.array([
    [0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6],
    [0.9, 0.1, 0.2, 0.05, 0.3, 0.4, 0.5],
    [0.1, 0.2, 0.3, 0.40, 0.5, 0.6, 0.7],
    [0.1, 0.2, 0.3, 0.40, 0.5, 0.6, 0.7],
], dtype=np.float32)


def test_hand_worked_protocol_case():
    result = evaluate_rank(DIST, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, max_rank=7)
    # Query 0 (pid 1, cam 1): g1 removed (same camera), g3 junk. Kept order g0-, g2+, g4-, g5+, g6-:
    #   matches at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4 = 0.5, first hit at rank 2.
    # Query 1 (pid 2, cam 1): kept order g1-, g2-, g4-, g5-, g6-, g0+ -> AP = 1/6, INP = 1/6, first hit at 6.
    # Query 2 (pid 4): no gallery image -> skipped.  Query 3 (pid 3, cam 2): only g6, same camera -> skipped.
    assert result["num_valid_queries"] == 2 and result["num_skipped_queries"] == 2
    assert result["mAP"] == pytest.approx((0.5 + 1 / 6) / 2)
    assert result["mINP"] == pytest.approx((0.5 + 1 / 6) / 2)
    np.testing.assert_allclose(result["cmc"], [0, 0.5, 0.5, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(result["ap"], [0.5, 1 / 6, np.nan, np.nan])


def test_protocol_masks_name_matches_same_camera_items_and_junk():
    match, removed, junk = protocol_masks(Q_PIDS[:2], Q_CAMS[:2], G_PIDS, G_CAMS)
    # Query 0 (pid 1, cam 1): g2 and g5 are matches, g1 is seen by its camera. Query 1 (pid 2, cam 1): g0 matches.
    assert match.tolist() == [[False, False, True, False, False, True, False],
                              [True, False, False, False, False, False, False]]
    assert removed.tolist() == [[False, True, False, False, False, False, False], [False] * 7]
    assert junk.tolist() == [False, False, False, True, False, False, False]


def test_devkit_average_precision_uses_the_trapezoid_rule():
    result = evaluate_rank(DIST[:1], Q_PIDS[:1], G_PIDS, Q_CAMS[:1], G_CAMS, ap_mode="devkit")
    # Query 0: matches at ranks 2 and 4 of 2 matches.
    #   i=1, r=2: recall step 1/2, old precision 0/1 = 0, precision 1/2 -> 0.5 * (0 + 0.5) / 2 = 0.125
    #   i=2, r=4: recall step 1/2, old precision 1/3, precision 2/4 -> 0.5 * (1/3 + 1/2) / 2 = 0.208333
    assert result["mAP"] == pytest.approx(0.125 + 0.5 * (1 / 3 + 0.5) / 2)


def test_ties_are_broken_by_gallery_index_and_removed_items_do_not_count():
    # g0 junk, g1 same camera (removed), g2 other person, g3 match, g4 other person: all at 0.5; g5 match at 0.2.
    g_pids, g_cams = np.array([-1, 1, 2, 1, 3, 1]), np.array([2, 1, 2, 2, 2, 3])
    dist = np.array([[0.5, 0.5, 0.5, 0.5, 0.5, 0.2]], dtype=np.float32)
    result = evaluate_rank(dist, np.array([1]), g_pids, np.array([1]), g_cams, max_rank=4)
    # Kept order: g5+ (0.2), g2- , g3+, g4- -> ranks 1 and 3: AP = (1 + 2/3) / 2, INP = 2/3.
    assert result["mAP"] == pytest.approx(5 / 6)
    assert result["mINP"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(result["cmc"], [1, 1, 1, 1])


def test_distractors_are_negatives():
    dist = np.array([[0.1, 0.2]], dtype=np.float32)
    result = evaluate_rank(dist, np.array([5]), np.array([0, 5]), np.array([1]), np.array([2, 2]), max_rank=2)
    assert result["mAP"] == pytest.approx(0.5) and result["cmc"].tolist() == [0.0, 1.0]


def test_a_gallery_seen_by_the_query_camera_only_is_an_error():
    with pytest.raises(ValueError, match="no query has a true match left.*own camera"):
        evaluate_rank(np.zeros((2, 3), np.float32), np.array([1, 2]), np.array([1, 2, 2]), np.array([1, 1]),
                      np.array([1, 1, 1]))


def test_empty_or_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="empty query"):
        evaluate_rank(np.zeros((0, 3)), np.array([]), np.array([1, 2, 3]), np.array([]), np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="g_camids has 2 entries but the distance matrix is 1 × 3"):
        evaluate_rank(np.zeros((1, 3)), np.array([1]), np.array([1, 2, 3]), np.array([1]), np.array([1, 1]))


def test_non_finite_distances_are_errors():
    # A NaN row used to rank as if it held perfect matches (AP above 1); NaN embeddings now stop the ranking.
    dist = np.array([[0.1, 0.5, 0.9], [np.nan, np.nan, np.nan]])
    with pytest.raises(ValueError, match=r"^3 of the 2 × 3 distances are not finite"):
        evaluate_rank(dist, np.array([1, 2]), np.array([1, 2, 3]), np.array([1, 1]), np.array([2, 2, 2]))
    dist[1] = [np.inf, 0.2, 0.3]
    with pytest.raises(ValueError, match=r"^1 of the 2 × 3 distances are not finite"):
        evaluate_rank(dist, np.array([1, 2]), np.array([1, 2, 3]), np.array([1, 1]), np.array([2, 2, 2]))


# ---------------------------------------------------------------------------------------------------------
# Against a plain per-query loop
# ---------------------------------------------------------------------------------------------------------


def reference_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank, ap_mode):
    """The textbook loop: stable sort a row, drop same-camera matches and junk, read off the matches."""
    aps, inps, cmc = [], [], np.zeros(max_rank)
    for i in range(len(q_pids)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])) & (g_pids[order] != -1)
        hits = (g_pids[order] == q_pids[i])[keep]
        if not hits.any():
            aps.append(np.nan)
            continue
        ranks = np.flatnonzero(hits) + 1.0
        n = np.arange(1, len(ranks) + 1)
        if ap_mode == "standard":
            aps.append(np.mean(n / ranks))
        else:
            old = np.array([(k - 1) / (r - 1) if r > 1 else 1.0 for k, r in zip(n, ranks, strict=True)])
            aps.append(np.sum((old + n / ranks) / 2) / len(ranks))
        inps.append(len(ranks) / ranks[-1])
        if ranks[0] <= max_rank:
            cmc[int(ranks[0]) - 1:] += 1
    return np.array(aps), inps, cmc


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_q=st.integers(1, 9), num_g=st.integers(1, 40), levels=st.integers(1, 6),
       chunk=st.integers(1, 5), ap_mode=st.sampled_from(["standard", "devkit"]))
def test_vectorised_metrics_equal_the_plain_loop(seed, num_q, num_g, levels, chunk, ap_mode):
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(0, 4, num_q), rng.integers(-1, 4, num_g)
    q_cams, g_cams = rng.integers(1, 4, num_q), rng.integers(1, 4, num_g)
    dist = (rng.integers(0, levels, (num_q, num_g)) + (rng.random((num_q, num_g)) if levels == 6 else 0))
    dist = dist.astype(np.float32)  # few levels: many ties
    aps, inps, cmc = reference_metrics(dist, q_pids, g_pids, q_cams, g_cams, 10, ap_mode)
    if np.all(np.isnan(aps)):
        with pytest.raises(ValueError):
            evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, ap_mode=ap_mode, chunk_size=chunk)
        return
    result = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10, ap_mode=ap_mode, chunk_size=chunk)
    valid = int(np.sum(~np.isnan(aps)))
    assert result["num_valid_queries"] == valid
    assert abs(result["mAP"] - np.nanmean(aps)) < 1e-9
    assert abs(result["mINP"] - np.mean(inps)) < 1e-9
    np.testing.assert_allclose(result["cmc"], cmc / valid, atol=1e-12)
    np.testing.assert_allclose(result["ap"], aps, atol=1e-12)


def test_pairwise_distances_match_their_definitions():
    torch.manual_seed(0)
    qf, gf = torch.randn(5, 8), torch.randn(7, 8)
    torch.testing.assert_close(pairwise_distance(qf, gf, chunk_size=2), torch.cdist(qf, gf) ** 2, rtol=1e-4, atol=1e-4)
    cosine = 1 - torch.nn.functional.cosine_similarity(qf[:, None], gf[None], dim=2)
    torch.testing.assert_close(pairwise_distance(qf, gf, "cosine"), cosine, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Re-ranking against the direct algorithm
# ---------------------------------------------------------------------------------------------------------


def direct_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value):
    """Zhong et al.'s algorithm written out with loops over items, dense and unchunked."""
    dist = np.concatenate([np.concatenate([q_q, q_g], 1), np.concatenate([q_g.T, g_g], 1)], 0) ** 2
    dist = (dist / dist.max(axis=0)).T
    n, num_q = len(dist), len(q_g)
    rank = np.argsort(dist, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        return [c for c in forward if i in rank[c, : k + 1]]

    encoding = np.zeros_like(dist)
    for i in range(n):
        core = reciprocal(i, k1)
        expanded = set(core)
        for candidate in core:
            half = reciprocal(candidate, int(np.around(k1 / 2)))
            if len(set(half) & set(core)) > 2 / 3 * len(half):
                expanded |= set(half)
        cols = sorted(expanded)
        weights = np.exp(-dist[i, cols])
        encoding[i, cols] = weights / weights.sum()
    if k2 != 1:
        encoding = np.stack([encoding[rank[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.zeros((num_q, n))
    for i in range(num_q):
        for j in range(n):
            shared = np.minimum(encoding[i], encoding[j]).sum()
            jaccard[i, j] = 1 - shared / (2 - shared)
    return (jaccard * (1 - lambda_value) + dist[:num_q] * lambda_value)[:, num_q:]


@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(20, 6, 0.3), (5, 3, 0.0), (4, 1, 0.5)])
def test_re_ranking_equals_the_direct_algorithm(k1, k2, lambda_value):
    rng = np.random.default_rng(k1)
    centres = rng.normal(size=(6, 8))
    feats = torch.tensor(centres[rng.integers(0, 6, 45)] + 0.6 * rng.normal(size=(45, 8)), dtype=torch.float32)
    qf, gf = feats[:12], feats[12:]
    q_g, q_q, g_g = (pairwise_distance(a, b).numpy().astype(np.float64) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    expected = direct_re_ranking(q_g, q_q, g_g, k1, k2, lambda_value)
    ours = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value, chunk_size=7)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The command line on a model trained for one epoch
# ---------------------------------------------------------------------------------------------------------


def test_cli_writes_results_equal_to_the_metrics_of_its_features(tiny_run: Path):
    report = evaluation.main(["--result-dir", str(tiny_run), "--workers", "0"])
    stored = json.loads((tiny_run / "eval" / "results.json").read_text())
    assert (tiny_run / "eval" / "cmc.png").is_file() and stored["mAP"] == report["mAP"]
    with np.load(tiny_run / "eval" / "features_test.npz") as cached:
        qf, gf = (torch.nn.functional.normalize(torch.from_numpy(cached[k]), dim=1) for k in ("qf", "gf"))
        distances = pairwise_distance(qf, gf).numpy()
        expected = evaluate_rank(distances, cached["q_pids"], cached["g_pids"], cached["q_camids"],
                                 cached["g_camids"])
    assert stored["mAP"] == pytest.approx(expected["mAP"]) and stored["rank1"] == pytest.approx(expected["cmc"][0])
    assert stored["num_query"] == 18 and stored["num_valid_queries"] + stored["num_skipped_queries"] == 18
    assert stored["manifest"]["sha256"] and stored["model"]["backbone"] == "resnet18"
    assert len(stored["cmc"]) == 50


def test_second_evaluation_reads_the_feature_cache(tiny_run: Path, caplog: pytest.LogCaptureFixture):
    evaluation.main(["--result-dir", str(tiny_run), "--workers", "0"])
    with caplog.at_level(logging.INFO, logger="reid"):
        evaluation.main(["--all_dir", str(tiny_run), "--workers", "0", "--metric", "cosine"])
    assert "features from" in caplog.text


def test_seed_flags_select_parts_and_check_the_backbone(tiny_run: Path, tmp_path: Path):
    report = evaluation.main(["--backbone_dir", str(tiny_run), "--ae_dir", str(tiny_run / "ae.pt"),
                              "--split", "seed_test", "--workers", "0", "--out", str(tmp_path)])
    assert report["split"] == "all_vs_all_test" and (tmp_path / "results.json").is_file()
    with pytest.raises(UserError, match="--backbone_type resnet34: the parts were trained as resnet18"):
        evaluation.main(["--result-dir", str(tiny_run), "--backbone_type", "resnet34"])


def test_a_part_that_does_not_fit_is_named(tiny_run: Path, tmp_path: Path):
    from model import build_autoencoder

    save_torch(build_autoencoder("vae", 512, 16).state_dict(), tmp_path / "ae.pt")
    with pytest.raises(UserError, match=r"ae.pt: does not fit resnet18 \+ vae"):
        evaluation.main(["--result-dir", str(tiny_run), "--ae_dir", str(tmp_path / "ae.pt"), "--no-cache"])


def test_a_part_file_holding_a_tensor_is_named(tiny_run: Path, tmp_path: Path):
    save_torch(torch.zeros(3), tmp_path / "backbone.pt")
    with pytest.raises(UserError, match=r"backbone.pt: not a state dict \(expected a mapping of names to tensors\)"):
        evaluation.main(["--result-dir", str(tiny_run), "--backbone_dir", str(tmp_path / "backbone.pt"), "--no-cache",
                         "--out", str(tmp_path)])


def test_a_missing_result_dir_or_one_without_config_is_named(tmp_path: Path):
    with pytest.raises(UserError, match=rf"--result-dir {re.escape(str(tmp_path / 'nowhere'))}: no such folder"):
        evaluation.main(["--result-dir", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match=rf"--result-dir {re.escape(str(tmp_path))}: no config.json there"):
        evaluation.main(["--result-dir", str(tmp_path)])


def test_a_dataset_dir_without_the_split_manifest_is_named(tiny_run: Path, market_tree: Path):
    manifest = re.escape(str(market_tree / "splits" / "val.json"))
    with pytest.raises(UserError, match=rf"--dataset-dir {re.escape(str(market_tree))}: no split manifest {manifest} "
                                        r"\(expected a root written by prepare.py --out, not a raw Market-1501"):
        evaluation.main(["--result-dir", str(tiny_run), "--dataset-dir", str(market_tree), "--split", "val"])


def test_a_relative_data_path_in_config_json_is_named_with_its_source(tiny_run: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    config = json.loads((tiny_run / "config.json").read_text())
    config["flags"]["data"] = "data/prepared"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"the training data named in run/config.json: data/prepared: no split manifest "
                                        r"data/prepared/splits/test.json .*give --dataset-dir PREPARED_ROOT"):
        evaluation.main(["--result-dir", "run", "--backbone_dir", str(tiny_run), "--ae_dir", str(tiny_run)])


@pytest.mark.parametrize(("flags", "message"), [
    (["--k1", "0"], "--k1 0: expected a positive number of neighbours"),
    (["--k2", "0"], "--k2 0: expected a positive number of neighbours"),
    (["--lambda-value", "1.5"], "--lambda-value 1.5: expected a weight between 0 and 1"),
    (["--max-rank", "0"], "--max-rank 0: expected a positive rank"),
    (["--aqe-k", "0"], "--aqe-k 0: expected a positive number of neighbours"),
    (["--aqe-alpha", "-1"], "--aqe-alpha -1.0: expected a non-negative exponent"),
    (["--verify-pairs", "1"], "--verify-pairs 1: expected 0 (skip) or at least 2 (one pair of each kind)"),
    (["--threshold", "7"], "--threshold 7.0: expected a probability between 0 and 1"),
    (["--batch-size", "0"], "--batch-size 0: expected a positive batch size and a non-negative number of workers"),
    (["--workers", "-1"], "--workers -1: expected a positive batch size and a non-negative number of workers"),
])
def test_out_of_range_flags_are_named(flags: list[str], message: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--result-dir", "runs/demo", "--rerank", *flags])
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


def test_cli_scores_the_siamese_head_on_unaugmented_pairs(tiny_run: Path, tmp_path: Path):
    report = evaluation.main(["--result-dir", str(tiny_run), "--workers", "0", "--verify-pairs", "300",
                              "--threshold", "0.4", "--flip", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "results.json").read_text())["verification"]
    assert stored == report["verification"]
    assert (tmp_path / "roc.png").is_file() and (tmp_path / "pr.png").is_file()
    model = build_trained(report["model"])
    with np.load(tmp_path / "features_test.npz") as plain:  # the unflipped features, extracted for the head
        feats = np.concatenate([plain["qf"], plain["gf"]])
        pids = np.concatenate([plain["q_pids"], plain["g_pids"]])
    idx_i, idx_j, labels = verification.verification_pairs(pids, 300)
    with torch.no_grad():
        logits = model.verify(torch.from_numpy(feats[idx_i]), torch.from_numpy(feats[idx_j]))
    expected = verification.verification_metrics(torch.sigmoid(logits).numpy(), labels, 0.4)
    assert stored["pairs"] == 300 and stored["confusion"]["tp"] + stored["confusion"]["fn"] == 150
    assert stored.pop("confusion") == expected.pop("confusion")
    assert stored == pytest.approx(expected)


def test_cross_domain_results_name_both_data_sets(tiny_run: Path, synthetic_prepared: Path, other_domain: Path):
    evaluation.main(["--result-dir", str(tiny_run), "--dataset-dir", str(other_domain), "--workers", "0"])
    out = tiny_run / "eval_synthetic-seed1"
    data = json.loads((out / "results.json").read_text())["data"]
    assert data["cross_domain"] is True
    assert (data["trained_on"]["name"], data["trained_on"]["format"]) == ("synthetic", "market1501")
    assert data["trained_on"]["root"] == str(synthetic_prepared)
    assert data["trained_on"]["manifests"]["train"] == sha256_file(synthetic_prepared / "splits" / "train.json")
    assert (data["evaluated_on"]["name"], data["evaluated_on"]["root"]) == ("synthetic-seed1", str(other_domain))
    assert data["evaluated_on"]["sha256"] == sha256_file(other_domain / "splits" / "test.json")
    home = evaluation.main(["--result-dir", str(tiny_run), "--dataset-dir", str(synthetic_prepared), "--workers", "0"])
    assert home["data"]["cross_domain"] is False and home["data"]["evaluated_on"]["name"] == "synthetic"
    assert json.loads((tiny_run / "eval" / "results.json").read_text())["data"] == home["data"]
    # Each data set keeps its own feature cache: the other domain's images, not the training domain's.
    with np.load(out / "features_test.npz") as away, np.load(tiny_run / "eval" / "features_test.npz") as at_home:
        assert str(away["key"]) != str(at_home["key"])
        away_query = {Path(other_domain / f).resolve() for f in away["q_files"]}
    assert away_query == {Path(r.path).resolve() for r in load_eval_records(other_domain, "test")[0]}


def test_the_flags_become_typed_options():
    import eval_inputs

    args = evaluation.parse_args(["--result-dir", "r", "--k1", "7", "--aqe", "--no-cache", "--img-size", "64", "32",
                                  "--split", "seed_val", "--flip", "--corrupt", "fog", "--severity", "2"])
    options = eval_inputs.evaluation_options(args)
    assert options.model == eval_inputs.ModelSource(result_dir=Path("r"), img_size=(64, 32))
    assert options.data == eval_inputs.SplitSource(split="all_vs_all_val")
    assert options.ranking == eval_inputs.RankingOptions(k1=7, aqe=True)
    assert options.embedding == eval_inputs.EmbeddingOptions(flip=True, cache=False)
    assert (options.corruption.names, options.corruption.severities, options.out) == (("fog",), (2,), None)


def test_split_labels_cut_the_records_at_the_query_count():
    import eval_inputs
    from layouts import ImageRecord

    records = [ImageRecord("q0.jpg", 3, 1, 0), ImageRecord("q1.jpg", 5, 2, 0), ImageRecord("g0.jpg", 3, 4, 0),
               ImageRecord("g1.jpg", -1, 1, 0), ImageRecord("g2.jpg", 0, 6, 0)]
    labels = eval_inputs.split_labels(records, 2)
    assert list(labels) == ["q_pids", "g_pids", "q_camids", "g_camids"]
    assert labels["q_pids"].tolist() == [3, 5] and labels["g_pids"].tolist() == [3, -1, 0]
    assert labels["q_camids"].tolist() == [1, 2] and labels["g_camids"].tolist() == [4, 1, 6]
