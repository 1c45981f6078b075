"""Data protocol, readers, synthetic generator and serving helpers (fast, synthetic)."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from shared_data import ml100k_path, require_ml100k

from m4r_export.data import (
    PAD_TOKEN,
    build_dataset,
    detect_format,
    encode_histories,
    load_dataset,
    pad_sequences,
    read_interactions,
    synthetic_interactions,
    write_inter_file,
)
from m4r_export.errors import UsageError

ML100K = ml100k_path()


# --------------------------------------------------------------------------------------------
# An independent, deliberately naive statement of RecBole's sequential pipeline (as configured by
# the Mamba4Rec reference): Counter-based k-core loop, dict factorize on the filtered rows in file
# order, stable sort by time then by user, data augmentation with a sliding window, leave-one-out.
# --------------------------------------------------------------------------------------------
def recbole_reference(rows, min_u, min_i, max_len):
    rows = list(rows)
    while True:
        uc = Counter(r[0] for r in rows)
        ic = Counter(r[1] for r in rows)
        ban_u = {u for u, c in uc.items() if c < min_u}
        ban_i = {i for i, c in ic.items() if c < min_i}
        if not ban_u and not ban_i:
            break
        rows = [r for r in rows if r[0] not in ban_u and r[1] not in ban_i]
    umap: dict[str, int] = {}
    imap: dict[str, int] = {}
    for u, i, _ in rows:
        umap.setdefault(u, len(umap) + 1)
        imap.setdefault(i, len(imap) + 1)
    recs = [(umap[u], imap[i], t) for u, i, t in rows]
    recs = sorted(recs, key=lambda r: r[2])
    recs = sorted(recs, key=lambda r: r[0])
    samples = []
    last, seq_start = None, 0
    for idx, (u, i, _) in enumerate(recs):
        if u != last:
            last, seq_start = u, idx
        else:
            if idx - seq_start > max_len:
                seq_start += 1
            samples.append((u, [r[1] for r in recs[seq_start:idx]], i))
    groups: dict[int, list[int]] = defaultdict(list)
    for k, s in enumerate(samples):
        groups[s[0]].append(k)
    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    nxt = [train, valid, test]
    for idxs in groups.values():
        legal = min(2, len(idxs) - 1)
        pr = len(idxs) - legal
        train.extend(idxs[:pr])
        for k in range(legal):
            nxt[-legal + k].append(idxs[pr])
            pr += 1
    itok = ["[PAD]"] + list(imap)
    utok = ["[PAD]"] + list(umap)
    return itok, utok, [[samples[k] for k in part] for part in nxt]


def assert_matches_reference(ds, ref):
    itok, utok, parts = ref
    assert ds.item_tokens == itok
    assert ds.user_tokens == utok
    for split, samples in zip((ds.train, ds.valid, ds.test), parts, strict=True):
        assert len(split) == len(samples)
        for r, (u, seq, target) in enumerate(samples):
            n = len(seq)
            assert split.user[r] == u
            assert split.target[r] == target
            assert split.item_seq_len[r] == n
            assert split.item_seq[r, :n].tolist() == seq
            assert not split.item_seq[r, n:].any()


def noisy_rows(seed, n_users=60, n_items=40, n=900):
    """Random log with heavy timestamp ties and duplicate (user, item) pairs."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    items = (rng.zipf(1.6, n) % n_items) + 1
    ts = rng.integers(0, 30, n).astype(float)  # many ties
    return [(f"u{u}", str(i), float(t)) for u, i, t in zip(users, items, ts, strict=True)]


@pytest.mark.parametrize(
    ("seed", "min_u", "min_i", "max_len"),
    [(0, 5, 5, 50), (1, 5, 5, 3), (2, 3, 7, 4), (3, 0, 0, 2), (4, 2, 1, 1), (5, 1, 1, 10), (6, 8, 3, 6)],
)
def test_protocol_matches_naive_recbole_pipeline(seed, min_u, min_i, max_len):
    rows = noisy_rows(seed)
    ds = build_dataset(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        max_seq_len=max_len,
        min_user_inter=min_u,
        min_item_inter=min_i,
    )
    assert_matches_reference(ds, recbole_reference(rows, min_u, min_i, max_len))


def test_small_example_by_hand():
    # user a: items x y z w v with a timestamp tie between z and w (file order z, w must be kept)
    rows = [
        ("b", "q", 1.0),
        ("a", "x", 5.0),
        ("a", "z", 7.0),
        ("a", "y", 6.0),
        ("a", "w", 7.0),
        ("a", "v", 9.0),
    ]
    u, i, t = zip(*rows, strict=True)
    ds = build_dataset(u, i, t, max_seq_len=2, min_user_inter=0, min_item_inter=0)
    # first appearance in file order: users b, a; items q, x, z, y, w, v
    assert ds.user_tokens == [PAD_TOKEN, "b", "a"]
    assert ds.item_tokens == [PAD_TOKEN, "q", "x", "z", "y", "w", "v"]
    assert ds.n_items == 7 and ds.n_users == 3 and ds.n_interactions == 6
    x, z, y, w, v = 2, 3, 4, 5, 6
    # a's chronological order: x y z w v -> samples y|x, z|xy, w|yz (window 2), v|zw
    assert ds.test.target.tolist() == [v]
    assert ds.test.item_seq.tolist() == [[z, w]]
    assert ds.valid.target.tolist() == [w]
    assert ds.valid.item_seq.tolist() == [[y, z]]
    assert ds.train.target.tolist() == [y, z]
    assert ds.train.item_seq.tolist() == [[x, 0], [x, y]]
    assert ds.train.item_seq_len.tolist() == [1, 2]
    assert ds.train.user.tolist() == [2, 2]
    for split in (ds.train, ds.valid, ds.test):
        assert split.item_seq.dtype == np.int64 and split.target.dtype == np.int64
        assert split.item_seq_len.dtype == np.int64 and split.user.dtype == np.int64


def test_kcore_filter_repeats_until_stable():
    # Item "rare" has 2 interactions -> dropped in round 1, which leaves user "u3" with 2 (< 3)
    # -> dropped in round 2, which leaves item "c" with 2 (< 3) -> dropped in round 3.
    rows = []
    for u in ("u1", "u2"):
        rows += [(u, it, float(k)) for k, it in enumerate(["a", "b", "d"])]
    rows += [("u3", "rare", 0.0), ("u3", "c", 1.0), ("u3", "c", 2.0), ("u4", "rare", 0.0)]
    rows += [("u4", "a", 1.0), ("u4", "b", 2.0), ("u4", "d", 3.0), ("u4", "c", 4.0)]
    u, i, t = zip(*rows, strict=True)
    ds = build_dataset(u, i, t, max_seq_len=5, min_user_inter=3, min_item_inter=3)
    assert ds.user_tokens == [PAD_TOKEN, "u1", "u2", "u4"]
    assert ds.item_tokens == [PAD_TOKEN, "a", "b", "d"]
    assert ds.n_interactions == 9
    assert_matches_reference(ds, recbole_reference(rows, 3, 3, 5))


def test_short_users_follow_recbole_leave_one_out():
    # 1 interaction: no sample; 2: one train sample; 3: train + test; 4: train + valid + test.
    rows = [("one", "a", 0.0)]
    rows += [("two", "a", 0.0), ("two", "b", 1.0)]
    rows += [("three", "a", 0.0), ("three", "b", 1.0), ("three", "c", 2.0)]
    rows += [("four", "a", 0.0), ("four", "b", 1.0), ("four", "c", 2.0), ("four", "d", 3.0)]
    u, i, t = zip(*rows, strict=True)
    ds = build_dataset(u, i, t, max_seq_len=4, min_user_inter=0, min_item_inter=0)
    two, three, four = 2, 3, 4
    assert ds.train.user.tolist() == [two, three, four]
    assert ds.valid.user.tolist() == [four]
    assert ds.test.user.tolist() == [three, four]


def test_window_keeps_most_recent_items():
    n = 12
    u, i, t = ["u"] * n, [f"i{k}" for k in range(n)], list(range(n))
    ds = build_dataset(u, i, t, max_seq_len=4, min_user_inter=0, min_item_inter=0)
    # test target = i11 (index 12); input = the 4 most recent items i7..i10 (indices 8..11)
    assert ds.test.target.tolist() == [12]
    assert ds.test.item_seq.tolist() == [[8, 9, 10, 11]]
    assert ds.test.item_seq_len.tolist() == [4]
    assert ds.valid.item_seq.tolist() == [[7, 8, 9, 10]]
    assert ds.train.item_seq_len.tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4]


def test_pad_sequences_and_encode_histories():
    seq, lens = pad_sequences([[1, 2, 3, 4, 5], [7], []], max_len=3)
    assert seq.tolist() == [[3, 4, 5], [7, 0, 0], [0, 0, 0]]
    assert lens.tolist() == [3, 1, 0]
    assert seq.dtype == np.int64 and lens.dtype == np.int64
    vocab = [PAD_TOKEN, "10", "20", "30"]
    seq, lens, unknown = encode_histories([[10, "20", "99"], ["30", PAD_TOKEN, "10", "20", "30"]], vocab, 3)
    assert seq.tolist() == [[1, 2, 0], [1, 2, 3]]
    assert lens.tolist() == [2, 3]
    assert unknown == 2
    seq2, _, _ = encode_histories([["20"]], {"20": 2}, 2)
    assert seq2.tolist() == [[2, 0]]
    with pytest.raises(UsageError):
        pad_sequences([[1]], 0)


# ------------------------------------------------------------------ readers and formats
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def synthetic_rows(seed=0):
    u, i, t = synthetic_interactions(n_users=40, n_items=30, seed=seed)
    return u, i, t


def test_formats_give_the_same_dataset(tmp_path):
    u, i, t = synthetic_rows()
    t = t.astype(np.int64)
    ref = build_dataset(u, i, t, max_seq_len=10)
    # RecBole .inter with extra and reordered columns
    lines = ["timestamp:float\trating:float\titem_id:token\tuser_id:token"]
    lines += [f"{c}\t3\t{b}\t{a}" for a, b, c in zip(u, i, t, strict=True)]
    inter = write(tmp_path / "syn" / "syn.inter", "\n".join(lines) + "\n")
    raw100k = write(
        tmp_path / "a" / "u.data", "".join(f"{a}\t{b}\t4\t{c}\n" for a, b, c in zip(u, i, t, strict=True))
    )
    raw1m = write(
        tmp_path / "b" / "ratings.dat",
        "".join(f"{a}::{b}::4::{c}\n" for a, b, c in zip(u, i, t, strict=True)),
    )
    for path in (inter, inter.parent, raw100k, raw100k.parent, raw1m, raw1m.parent):
        ds = load_dataset(path, max_seq_len=10)
        assert ds.item_tokens == ref.item_tokens
        assert ds.user_tokens == ref.user_tokens
        for a, b in ((ds.train, ref.train), (ds.valid, ref.valid), (ds.test, ref.test)):
            np.testing.assert_array_equal(a.item_seq, b.item_seq)
            np.testing.assert_array_equal(a.target, b.target)
    assert detect_format(inter.parent) == (inter, "recbole")
    assert detect_format(raw1m.parent) == (raw1m, "ml-1m")


def test_reader_keeps_raw_tokens_skips_blank_lines_and_crlf(tmp_path):
    p = write(
        tmp_path / "x.inter",
        "user_id:token\titem_id:token\ttimestamp:float\r\n007\tA b\t1\r\n\r\n7\tc\t2.5\r\n",
    )
    inter = read_interactions(p)
    assert inter.users == ["007", "7"]
    assert inter.items == ["A b", "c"]
    assert inter.timestamps.tolist() == [1.0, 2.5]


def test_header_sniffing_for_other_names(tmp_path):
    p = write(tmp_path / "log.tsv", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    assert detect_format(p) == (p, "recbole")


@pytest.mark.parametrize(
    ("name", "text", "needles"),
    [
        ("empty.inter", "", ["empty.inter", "empty", "header"]),
        ("blank.inter", "\n\n", ["blank.inter", "empty"]),
        (
            "header.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n",
            ["header.inter", "no interaction rows"],
        ),
        (
            "nocol.inter",
            "user_id:token\titem_id:token\trating:float\n1\t2\t3\n",
            ["nocol.inter", "timestamp", "user_id:token"],
        ),
        (
            "badts.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\t2020-01-01\n",
            ["badts.inter", "line 3", "'2020-01-01'", "numeric"],
        ),
        (
            "nants.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\tnan\n",
            ["nants.inter", "line 3", "'nan'"],
        ),
        (
            "short.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\n",
            ["short.inter", "line 3", "expected 3 fields"],
        ),
        ("u.data", "1\t2\t3\tlater\n", ["u.data", "line 1", "'later'"]),
        ("ratings.dat", "", ["ratings.dat", "empty"]),
        # a CSV log is read (issue 22); a missing column is named with what was found
        ("notes.csv", "user,item,time\n1,2,3\n", ["notes.csv", "no user column 'user_id'", "'user', 'item'"]),
        ("notes.xyz", "user,item,time\n1,2,3\n", ["notes.xyz", "unsupported", "RecBole", "CSV/TSV"]),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, name, text, needles):
    p = write(tmp_path / name, text)
    with pytest.raises(UsageError) as exc:
        load_dataset(p)
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_dataset(tmp_path / "nope.inter")
    (tmp_path / "d").mkdir()
    with pytest.raises(UsageError, match="no supported interaction file"):
        load_dataset(tmp_path / "d")


def test_all_users_filtered_out_names_thresholds(tmp_path):
    u, i, t = synthetic_rows()
    p = tmp_path / "s.inter"
    write_inter_file(p, u, i, t)
    with pytest.raises(UsageError) as exc:
        load_dataset(p, min_user_inter=10_000)
    msg = str(exc.value)
    assert "s.inter" in msg and ">= 10000" in msg and "Lower the thresholds" in msg
    with pytest.raises(UsageError, match="no interactions"):
        build_dataset([], [], [], max_seq_len=5)
    with pytest.raises(UsageError, match="same length"):
        build_dataset(["a"], ["b", "c"], [1.0], max_seq_len=5)


def test_empty_user_or_item_rows_are_dropped_like_recbole(tmp_path):
    rows = "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n\t5\t4\n1\t\t5\n2\t2\t6\n"
    inter = read_interactions(write(tmp_path / "x.inter", rows))
    assert inter.users == ["1", "2"] and inter.n_skipped == 2


# ------------------------------------------------------------------ synthetic generator
def test_synthetic_is_deterministic_and_roundtrips(tmp_path):
    a = synthetic_interactions(n_users=50, n_items=40, seed=3)
    b = synthetic_interactions(n_users=50, n_items=40, seed=3)
    c = synthetic_interactions(n_users=50, n_items=40, seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])
    assert np.all(np.diff(a[2]) >= 0)  # log order
    assert set(np.unique(a[1])) <= set(range(1, 41))
    p = tmp_path / "syn.inter"
    write_inter_file(p, *a)
    back = read_interactions(p)
    assert back.users == [str(x) for x in a[0]]
    assert back.items == [str(x) for x in a[1]]
    np.testing.assert_array_equal(back.timestamps, a[2])
    write_inter_file(tmp_path / "r.inter", a[0], a[1], a[2] + 0.5, ratings=np.ones(len(a[0])))
    assert read_interactions(tmp_path / "r.inter").timestamps[0] == a[2][0] + 0.5


def hit_at_10(scores_fn, split):
    hits = 0
    for r in range(len(split)):
        last = int(split.item_seq[r, split.item_seq_len[r] - 1])
        scores = scores_fn(last).astype(float)
        scores[0] = -np.inf
        top = np.argsort(-scores, kind="stable")[:10]
        hits += int(split.target[r] in top)
    return hits / len(split)


def test_synthetic_has_learnable_sequential_structure():
    ds = build_dataset(*synthetic_interactions(), max_seq_len=20)
    assert ds.n_users - 1 == 300 and ds.n_items - 1 == 120  # nothing filtered by 5-core
    popularity = np.bincount(ds.train.target, minlength=ds.n_items)
    # first-order transition counts from the training samples
    trans = np.zeros((ds.n_items, ds.n_items))
    last = ds.train.item_seq[np.arange(len(ds.train)), ds.train.item_seq_len - 1]
    np.add.at(trans, (last, ds.train.target), 1)
    pop_hit = hit_at_10(lambda _: popularity, ds.test)
    markov_hit = hit_at_10(lambda item: trans[item] + 1e-3 * popularity, ds.test)
    assert pop_hit < 0.3
    assert markov_hit > 0.7
    assert markov_hit > pop_hit + 0.4


def test_summary_and_protocol():
    ds = build_dataset(*synthetic_interactions(n_users=30, n_items=20), max_seq_len=8)
    s = ds.summary()
    assert "30 users" in s and "20 items" in s and f"{ds.n_interactions} interactions" in s
    assert ds.protocol()["max_seq_len"] == 8
    assert ds.item_index[ds.item_tokens[5]] == 5 and PAD_TOKEN not in ds.item_index
    sub = ds.train.subset(slice(0, 3))
    assert len(sub) == 3 and sub.item_seq.shape == (3, 8)


# ------------------------------------------------------------------ MovieLens-100K (shared data)
def test_ml100k_stats_and_speed():
    require_ml100k()
    t0 = time.perf_counter()
    ds = load_dataset(ML100K, max_seq_len=50)
    elapsed = time.perf_counter() - t0
    assert (ds.n_users - 1, ds.n_items - 1, ds.n_interactions) == (943, 1349, 99287)
    assert len(ds.valid) == len(ds.test) == 943
    assert len(ds.train) + len(ds.valid) + len(ds.test) == 99287 - 943
    # first rows of the file: user 196 item 242, user 186 item 302 -> indices 1
    assert ds.user_tokens[1:3] == ["196", "186"] and ds.item_tokens[1:3] == ["242", "302"]
    assert elapsed < 10


@pytest.mark.slow
def test_ml100k_matches_naive_recbole_pipeline():
    require_ml100k()
    inter = read_interactions(ML100K)
    rows = list(zip(inter.users, inter.items, inter.timestamps.tolist(), strict=True))
    ds = build_dataset(inter.users, inter.items, inter.timestamps, max_seq_len=50)
    itok, utok, parts = recbole_reference(rows, 5, 5, 50)
    assert ds.item_tokens == itok and ds.user_tokens == utok
    for split, samples in zip((ds.train, ds.valid, ds.test), parts, strict=True):
        assert split.target.tolist() == [s[2] for s in samples]
        assert split.item_seq_len.tolist() == [len(s[1]) for s in samples]
