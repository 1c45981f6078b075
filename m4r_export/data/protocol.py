"""The RecBole sequential-recommendation protocol used by the Mamba4Rec reference config.

Steps (each mirrors RecBole 1.x so that a model trained with the reference code sees the same
ids and the same samples):

1. **k-core filtering** (``user_inter_num_interval: "[5,inf)"``, same for items): drop users with
   fewer than ``min_user_inter`` and items with fewer than ``min_item_inter`` interactions,
   both at once, and repeat until nothing changes.
2. **Id mapping**: on the filtered rows in file order, tokens get indices 1..n in order of first
   appearance (``pd.factorize``), users and items separately; index 0 is ``"[PAD]"``.
3. **Ordering**: interactions sorted by (user index, timestamp) with a stable sort, so ties in
   timestamp keep file order.
4. **Samples**: every interaction but a user's first is a target; its input is the user's earlier
   items, the most recent ``max_seq_len`` of them, right-padded with 0.
5. **Leave-one-out split** (``eval_args.split: {LS: valid_and_test}``, ``order: TO``): per user the
   last sample goes to test, the second last to valid, the rest to train. Users with too few
   samples follow RecBole: 2 samples -> train + test, 1 sample -> train only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:
    from .tables import Columns

PAD_TOKEN = "[PAD]"


@dataclass(eq=False)
class Split:
    """One split's samples: ``item_seq[r, :item_seq_len[r]]`` (oldest first, 0-padded) -> ``target[r]``."""

    item_seq: np.ndarray  # (n, max_len) int64
    item_seq_len: np.ndarray  # (n,) int64
    target: np.ndarray  # (n,) int64
    user: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def subset(self, index: np.ndarray | slice) -> Split:
        """Rows ``index`` of this split (e.g. a batch or a distributed shard)."""
        return Split(self.item_seq[index], self.item_seq_len[index], self.target[index], self.user[index])


@dataclass(eq=False)
class SequenceDataset:
    """A dataset ready for training and evaluation.

    ``item_tokens[i]`` is the raw token of item index ``i`` (``item_tokens[0] == "[PAD]"``), likewise
    ``user_tokens``. ``n_items``/``n_users`` count ``[PAD]`` too, as RecBole's ``item_num``/``user_num``
    do: ``n_items`` is the number of rows of the item embedding. The real counts are
    ``n_items - 1`` and ``n_users - 1``.
    """

    item_tokens: list[str]
    user_tokens: list[str]
    train: Split
    valid: Split
    test: Split
    max_seq_len: int
    n_interactions: int = 0
    min_user_inter: int = 5
    min_item_inter: int = 5
    source: str = ""
    #: seconds spent reading and preprocessing (set by load_dataset)
    load_seconds: float = 0.0
    _item_index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return len(self.item_tokens)

    @property
    def n_users(self) -> int:
        return len(self.user_tokens)

    @property
    def item_index(self) -> dict[str, int]:
        """Raw item token -> index (``[PAD]`` excluded)."""
        if self._item_index is None:
            self._item_index = {t: i for i, t in enumerate(self.item_tokens) if i > 0}
        return self._item_index

    def protocol(self) -> dict[str, Any]:
        """The preprocessing parameters (plain values; stored beside the vocabulary in checkpoints)."""
        return {
            "max_seq_len": self.max_seq_len,
            "min_user_inter": self.min_user_inter,
            "min_item_inter": self.min_item_inter,
            "split": "leave-one-out (valid = second last, test = last), chronological",
        }

    def known_items(self, split: str) -> list[np.ndarray]:
        """Per row of ``split`` ("valid" or "test"): every item its user interacted with before that
        row's target, sorted and unique: the user's full known history, not only the ``max_seq_len``
        window the model sees. What a deployment would exclude (``exclude_items``) and what
        ``m4r evaluate --exclude-history`` masks. The rows before a test target are the user's train
        and valid samples (leave-one-out), whose windows and targets together hold every earlier item.
        """
        if split not in ("valid", "test"):
            raise UsageError(f"known items are defined for the valid and test splits, not {split!r}")
        users: list[np.ndarray] = []
        items: list[np.ndarray] = []
        for part in (self.train,) if split == "valid" else (self.train, self.valid):
            valid = np.arange(part.item_seq.shape[1])[None, :] < part.item_seq_len[:, None]
            users += [np.broadcast_to(part.user[:, None], part.item_seq.shape)[valid], part.user]
            items += [part.item_seq[valid], part.target]
        keys = np.unique(np.concatenate(users).astype(np.int64) * self.n_items + np.concatenate(items))
        key_user, key_item = keys // self.n_items, keys % self.n_items
        rows = getattr(self, split).user
        start = np.searchsorted(key_user, rows, side="left")
        end = np.searchsorted(key_user, rows, side="right")
        return [key_item[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)]

    def summary(self) -> str:
        users, items, n = self.n_users - 1, self.n_items - 1, self.n_interactions
        density = n / max(users * items, 1)
        src = f"{self.source}: " if self.source else ""
        return (
            f"{src}{users} users, {items} items, {n} interactions (density {density:.4f}) after "
            f"{self.min_user_inter}/{self.min_item_inter}-core filtering; samples train {len(self.train)}, "
            f"valid {len(self.valid)}, test {len(self.test)}; max_seq_len {self.max_seq_len}"
        )


TOKEN_HINT = (
    "raw item tokens? map them to indices first: encode_histories(histories, item_tokens, max_len) "
    "with the checkpoint's item_tokens or the export's items.txt (a token '5' is not index 5)"
)


def index_rows(histories: Any, where: str) -> list[list[int]]:
    """``histories`` (one sequence of integer item indices per row) as lists of ints.

    Refuses ``None``, strings (raw tokens read as numbers would silently mean other items), floats
    and booleans with a :class:`UsageError` naming the row and the value.
    """
    if isinstance(histories, np.ndarray) and histories.dtype.kind in "iu":
        return [[int(v) for v in row] for row in np.atleast_2d(histories)]
    if histories is None or isinstance(histories, (str, bytes)) or not isinstance(histories, Iterable):
        raise UsageError(
            f"{where}: expected one list of item indices per row (e.g. [[3, 17, 9]]), "
            f"got {type(histories).__name__}"
        )
    rows: list[list[int]] = []
    for r, h in enumerate(histories):
        if h is None or isinstance(h, (str, bytes)) or not isinstance(h, Iterable):
            hint = f"; {TOKEN_HINT}" if isinstance(h, str) else ""
            raise UsageError(
                f"{where}: row {r} is {h!r}, expected a list of item indices (e.g. [3, 17, 9]){hint}"
            )
        row: list[int] = []
        for v in h:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                hint = f"; {TOKEN_HINT}" if isinstance(v, (str, bytes, np.str_)) else ""
                raise UsageError(
                    f"{where}: row {r} holds {v!r} ({type(v).__name__}); item ids are integer indices{hint}"
                )
            row.append(int(v))
        rows.append(row)
    return rows


def index_array(values: Any, name: str) -> np.ndarray:
    """``values`` as an int64 array; strings, floats and booleans are refused (see :func:`index_rows`)."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "iu":
        hint = f"; {TOKEN_HINT}" if arr.dtype.kind in "USO" else ""
        raise UsageError(f"{name} must hold integer item indices, got {arr.dtype} values{hint}")
    return arr.astype(np.int64, copy=False)


def pad_sequences(histories: Sequence[Sequence[int]], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad item-index histories (oldest first) to ``(n, max_len)``, keeping the most recent items.

    Returns ``(item_seq, item_seq_len)`` as int64. An empty history gives a row of zeros with
    length 0 (callers decide what that means; the model needs length >= 1).
    """
    if max_len < 1:
        raise UsageError(f"max_len must be >= 1, got {max_len}")
    rows = index_rows(histories, "histories")
    n = len(rows)
    item_seq = np.zeros((n, max_len), dtype=np.int64)
    item_seq_len = np.zeros(n, dtype=np.int64)
    for r, h in enumerate(rows):
        tail = h[-max_len:]
        item_seq[r, : len(tail)] = tail
        item_seq_len[r] = len(tail)
    return item_seq, item_seq_len


def encode_histories(
    histories: Iterable[Iterable[Any]],
    item_tokens: Sequence[str] | Mapping[str, int],
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Map histories of raw item tokens to padded index sequences for serving.

    ``item_tokens`` is the vocabulary (index -> token list with ``"[PAD]"`` at 0, as stored in the
    checkpoint) or a prebuilt token -> index mapping. Tokens are compared as strings
    (``str(token)``), like RecBole's token fields. Unknown tokens (and ``"[PAD]"``) are dropped; the
    number dropped is returned so callers can report it.

    Returns ``(item_seq, item_seq_len, n_unknown)``.
    """
    if isinstance(item_tokens, Mapping):
        index = item_tokens
    else:
        index = {t: i for i, t in enumerate(item_tokens) if i > 0}
    encoded: list[list[int]] = []
    n_unknown = 0
    for h in histories:
        row = []
        for tok in h:
            i = index.get(str(tok), 0)
            if i > 0:
                row.append(i)
            else:
                n_unknown += 1
        encoded.append(row)
    item_seq, item_seq_len = pad_sequences(encoded, max_len)
    return item_seq, item_seq_len, n_unknown


def _as_str_list(values: Any, name: str) -> list[str]:
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise UsageError(f"{name} must be one-dimensional, got shape {values.shape}")
        return list(map(str, values.tolist()))
    return list(map(str, values))


def factorize(tokens: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """``pd.factorize`` semantics: codes 0..k-1 in order of first appearance, and the uniques."""
    uniques = list(dict.fromkeys(tokens))  # insertion order = first appearance
    index = {t: k for k, t in enumerate(uniques)}
    codes = np.fromiter(map(index.__getitem__, tokens), dtype=np.int64, count=len(tokens))
    return codes, uniques


def kcore_mask(
    user_codes: np.ndarray, item_codes: np.ndarray, min_user_inter: int, min_item_inter: int
) -> np.ndarray:
    """Rows kept by iterative k-core filtering (users and items banned together, until stable)."""
    n_users = int(user_codes.max()) + 1 if user_codes.size else 0
    n_items = int(item_codes.max()) + 1 if item_codes.size else 0
    keep = np.ones(user_codes.shape[0], dtype=bool)
    while True:
        ucount = np.bincount(user_codes[keep], minlength=n_users)
        icount = np.bincount(item_codes[keep], minlength=n_items)
        bad_user = (ucount > 0) & (ucount < min_user_inter)
        bad_item = (icount > 0) & (icount < min_item_inter)
        if not bad_user.any() and not bad_item.any():
            return keep
        keep &= ~(bad_user[user_codes] | bad_item[item_codes])


def _remap_first_appearance(codes: np.ndarray, uniques: list[str]) -> tuple[np.ndarray, list[str]]:
    """Re-index ``codes`` (over kept rows) to 1..k by first appearance; return new codes and tokens."""
    uniq, first = np.unique(codes, return_index=True)
    order = uniq[np.argsort(first, kind="stable")]
    lookup = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    lookup[order] = np.arange(1, order.size + 1, dtype=np.int64)
    tokens = [PAD_TOKEN] + [uniques[c] for c in order.tolist()]
    return lookup[codes], tokens


def _gather_split(
    items: np.ndarray,
    users: np.ndarray,
    pos: np.ndarray,
    starts: np.ndarray,
    max_seq_len: int,
    chunk: int = 65536,
) -> Split:
    """Samples with targets at sorted positions ``pos``; history from ``starts`` (the user's first row)."""
    n = pos.shape[0]
    begin = np.maximum(starts, pos - max_seq_len)
    lengths = pos - begin
    # windows[j] = items[j : j + max_seq_len] (a view); gather the rows, then zero the padding.
    padded = np.concatenate([items, np.zeros(max_seq_len, dtype=np.int64)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, max_seq_len)
    item_seq = np.empty((n, max_seq_len), dtype=np.int64)
    ar = np.arange(max_seq_len, dtype=np.int64)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        block = item_seq[a:b]
        block[...] = windows[begin[a:b]]  # fancy indexing of the view copies whole rows (fast path)
        block *= ar[None, :] < lengths[a:b, None]
    return Split(item_seq, lengths.astype(np.int64), items[pos].copy(), users[pos].copy())


def build_dataset(
    user_ids: Sequence[Any] | np.ndarray,
    item_ids: Sequence[Any] | np.ndarray,
    timestamps: Sequence[float] | np.ndarray,
    *,
    max_seq_len: int,
    min_user_inter: int = 5,
    min_item_inter: int = 5,
    source: str = "",
) -> SequenceDataset:
    """Apply the reference protocol to raw interaction columns (in file row order).

    ``user_ids``/``item_ids`` are raw tokens (converted with ``str``); ``timestamps`` numbers.
    """
    name = source or "the interaction data"
    if max_seq_len < 1:
        raise UsageError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if min_user_inter < 0 or min_item_inter < 0:
        raise UsageError(
            f"interaction thresholds must be >= 0, got min_user_inter={min_user_inter}, "
            f"min_item_inter={min_item_inter}"
        )
    users_raw = _as_str_list(user_ids, "user_ids")
    items_raw = _as_str_list(item_ids, "item_ids")
    try:
        ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name}: timestamps must be numeric ({exc})") from None
    if not (len(users_raw) == len(items_raw) == ts.shape[0]):
        raise UsageError(
            f"{name}: user_ids, item_ids and timestamps must have the same length, got "
            f"{len(users_raw)}, {len(items_raw)}, {ts.shape[0]}"
        )
    if not users_raw:
        raise UsageError(f"{name} has no interactions; provide at least one (user, item, timestamp) row")
    if not np.isfinite(ts).all():
        bad = int(np.flatnonzero(~np.isfinite(ts))[0])
        raise UsageError(f"{name}: timestamp of row {bad} is {ts[bad]}; timestamps must be finite numbers")

    ucodes, uuniq = factorize(users_raw)
    icodes, iuniq = factorize(items_raw)
    keep = kcore_mask(ucodes, icodes, min_user_inter, min_item_inter)
    if not keep.any():
        raise UsageError(
            f"{name}: every user was filtered out by the k-core filter (users need >= {min_user_inter} and "
            f"items >= {min_item_inter} interactions, applied repeatedly; the input has {len(uuniq)} users, "
            f"{len(iuniq)} items, {len(users_raw)} interactions). Lower the thresholds "
            "(min_user_inter / min_item_inter, --min-user-inter / --min-item-inter) or use more data"
        )
    kidx = np.flatnonzero(keep)
    users, user_tokens = _remap_first_appearance(ucodes[kidx], uuniq)
    items, item_tokens = _remap_first_appearance(icodes[kidx], iuniq)
    ts = ts[kidx]

    # RecBole: sort by time (stable), then by user (stable) -> per user chronological, ties in file order.
    order = np.argsort(ts, kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    users, items = users[order], items[order]

    n = users.shape[0]
    counts = np.bincount(users, minlength=len(user_tokens))
    first_row = np.concatenate(([0], np.cumsum(counts)[:-1]))  # first sorted row of each user
    user_start = first_row[users]
    pos_in_user = np.arange(n, dtype=np.int64) - user_start
    n_samples = counts[users] - 1  # samples of this row's user
    is_target = pos_in_user >= 1
    sample_no = pos_in_user - 1  # 0-based index of the sample among the user's samples
    legal = np.minimum(2, np.maximum(n_samples - 1, 0))  # RecBole: min(leave_one_num, samples - 1)
    from_end = n_samples - sample_no  # 1 for the last sample
    test_mask = is_target & (legal >= 1) & (from_end == 1)
    valid_mask = is_target & (legal >= 2) & (from_end == 2)
    train_mask = is_target & ~test_mask & ~valid_mask

    def split(mask: np.ndarray) -> Split:
        pos = np.flatnonzero(mask)
        return _gather_split(items, users, pos, user_start[pos], max_seq_len)

    return SequenceDataset(
        item_tokens=item_tokens,
        user_tokens=user_tokens,
        train=split(train_mask),
        valid=split(valid_mask),
        test=split(test_mask),
        max_seq_len=max_seq_len,
        n_interactions=int(n),
        min_user_inter=min_user_inter,
        min_item_inter=min_item_inter,
        source=source,
    )


def load_dataset(
    path: Any,
    *,
    max_seq_len: int = 50,
    min_user_inter: int = 5,
    min_item_inter: int = 5,
    encoding: str = "utf-8",
    columns: Columns | None = None,
) -> SequenceDataset:
    """Read an interaction file (RecBole ``.inter``, MovieLens ``u.data``/``ratings.dat``, CSV/TSV or
    Parquet with the column names in ``columns``, or a directory holding one; text in ``encoding``,
    strictly) and apply the reference protocol (module docstring)."""
    from .tables import read_log

    t0 = time.perf_counter()
    inter = read_log(path, columns, encoding)
    ds = build_dataset(
        inter.users,
        inter.items,
        inter.timestamps,
        max_seq_len=max_seq_len,
        min_user_inter=min_user_inter,
        min_item_inter=min_item_inter,
        source=inter.source,
    )
    ds.load_seconds = time.perf_counter() - t0
    return ds
