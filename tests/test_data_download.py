"""MovieLens download/convert (no network: archives are built here) and the `m4r data` CLI."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from shared_data import ml100k_path, require_ml100k

from m4r_export.cli import main
from m4r_export.data import MOVIELENS, convert_archive, download_movielens, load_dataset, read_interactions
from m4r_export.errors import UsageError

U_DATA = "".join(
    f"{u}\t{i}\t{(u + i) % 5 + 1}\t{880000000 + 10 * k}\n"
    for k, (u, i) in enumerate((u, i) for u in range(1, 9) for i in range(1, 9) if (u * i) % 3)
)


def make_zip(path: Path, member: str, text: str) -> tuple[Path, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, text)
        zf.writestr(member.rsplit("/", 1)[0] + "/README", "test archive")
    path.write_bytes(buf.getvalue())
    return path, hashlib.sha256(buf.getvalue()).hexdigest()


def test_spec_constants_are_well_formed():
    for spec in MOVIELENS.values():
        assert spec.url.startswith("https://files.grouplens.org/datasets/movielens/")
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert len(spec.md5) == 32 and spec.size > 1_000_000


def test_convert_archive_100k_keeps_row_order(tmp_path):
    archive, _ = make_zip(tmp_path / "ml-100k.zip", "ml-100k/u.data", U_DATA)
    out = convert_archive(archive, "movielens-100k", tmp_path / "out" / "ml-100k.inter")
    lines = out.read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float"
    assert lines[1:] == U_DATA.splitlines()
    inter = read_interactions(out)
    assert inter.users[:3] == [line.split("\t")[0] for line in U_DATA.splitlines()[:3]]


def test_convert_archive_1m(tmp_path):
    text = U_DATA.replace("\t", "::")
    archive, _ = make_zip(tmp_path / "ml-1m.zip", "ml-1m/ratings.dat", text)
    out = convert_archive(archive, "movielens-1m", tmp_path / "ml-1m.inter")
    assert out.read_text().splitlines()[1:] == U_DATA.splitlines()


def test_convert_archive_rejects_wrong_archives(tmp_path):
    archive, _ = make_zip(tmp_path / "a.zip", "other/u.item", "1|x\n")
    with pytest.raises(UsageError, match="no ml-100k/u.data"):
        convert_archive(archive, "movielens-100k", tmp_path / "x.inter")
    (tmp_path / "b.zip").write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="not a valid zip"):
        convert_archive(tmp_path / "b.zip", "movielens-100k", tmp_path / "x.inter")
    assert not (tmp_path / "x.inter").exists()


def test_download_via_file_url_then_cache(tmp_path):
    archive, sha = make_zip(tmp_path / "src.zip", "ml-100k/u.data", U_DATA)
    dest = tmp_path / "cache"
    out = download_movielens("movielens-100k", dest, url=archive.as_uri(), sha256=sha)
    assert out == dest / "ml-100k" / "ml-100k.inter"
    assert (dest / "downloads" / "ml-100k.zip").read_bytes() == archive.read_bytes()
    ds = load_dataset(out, min_user_inter=1, min_item_inter=1, max_seq_len=5)
    assert ds.n_interactions == len(U_DATA.splitlines())

    def no_network(url, fh):
        raise AssertionError("must not fetch again")

    assert download_movielens("movielens-100k", dest, fetch=no_network, sha256=sha) == out
    # --force re-converts from the verified cached archive, still without fetching
    out.write_text("garbage")
    assert download_movielens("ml-100k", dest, fetch=no_network, sha256=sha, force=True) == out
    assert out.read_text().splitlines()[1:] == U_DATA.splitlines()


def test_download_with_fake_fetch_and_checksum_mismatch(tmp_path):
    archive, sha = make_zip(tmp_path / "src.zip", "ml-1m/ratings.dat", U_DATA.replace("\t", "::"))
    payload = archive.read_bytes()
    calls = []

    def fake_fetch(url, fh):
        calls.append(url)
        fh.write(payload[:100])  # looks like a start, then a "corrupted" stream
        fh.write(b"\0" * (len(payload) - 100))

    dest = tmp_path / "cache"
    with pytest.raises(UsageError) as exc:
        download_movielens("movielens-1m", dest, fetch=fake_fetch, sha256=sha)
    msg = str(exc.value)
    assert "sha256" in msg and sha in msg and "download again" in msg
    assert calls == [MOVIELENS["movielens-1m"].url]
    leftovers = [p for p in dest.rglob("*") if p.is_file()]
    assert leftovers == []  # no partial archive, no .inter

    def good_fetch(url, fh):
        fh.write(payload)

    out = download_movielens("movielens-1m", dest, fetch=good_fetch, sha256=sha)
    assert out.read_text().splitlines()[1:] == U_DATA.splitlines()


def test_official_checksum_is_enforced_by_default(tmp_path):
    archive, _ = make_zip(tmp_path / "src.zip", "ml-100k/u.data", U_DATA)
    with pytest.raises(UsageError, match="size .* does not match the expected 4924029"):
        download_movielens("movielens-100k", tmp_path / "c", url=archive.as_uri())
    assert not any(p.is_file() for p in (tmp_path / "c").rglob("*"))


def test_network_failure_is_a_clear_error(tmp_path):
    def offline(url, fh):
        raise OSError("Network is unreachable")

    with pytest.raises(UsageError, match="could not download .*--archive FILE"):
        download_movielens("movielens-100k", tmp_path / "c", fetch=offline)
    assert not any(p.is_file() for p in (tmp_path / "c").rglob("*"))


def test_cli_download_with_archive_and_stats(tmp_path):
    archive, sha = make_zip(tmp_path / "ml-100k.zip", "ml-100k/u.data", U_DATA)
    runner = CliRunner()
    res = runner.invoke(
        main, ["data", "download", "movielens-100k", "--dest", str(tmp_path / "c"), "--archive", str(archive)]
    )
    assert res.exit_code == 2, res.output
    assert "does not match the expected" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "c" / "ml-100k" / "ml-100k.inter").exists()

    out = download_movielens("movielens-100k", tmp_path / "c", archive=archive, sha256=sha)
    res = runner.invoke(main, ["data", "stats", str(out), "--min-user-inter", "1", "--min-item-inter", "1"])
    assert res.exit_code == 0, res.output
    assert "users" in res.output and str(len(U_DATA.splitlines())) in res.output


def test_cli_synthetic_and_stats(tmp_path):
    runner = CliRunner()
    out = tmp_path / "syn.inter"
    res = runner.invoke(main, ["data", "synthetic", str(out), "--users", "50", "--items", "30"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["data", "stats", str(out)])
    assert res.exit_code == 0, res.output
    assert "50" in res.output and "30" in res.output
    res = runner.invoke(main, ["data", "stats", str(out), "--min-user-inter", "999"])
    assert res.exit_code == 2 and "Lower the thresholds" in res.output


ML100K = ml100k_path()


def test_conversion_reproduces_recbole_ml100k_file(tmp_path):
    require_ml100k()
    # RecBole's ml-100k.inter is u.data in file order under a typed header: rebuild u.data from it,
    # zip it like GroupLens does, convert, and expect the very same bytes.
    shared = ML100K.read_bytes()
    u_data = shared.decode().split("\n", 1)[1]
    archive, _ = make_zip(tmp_path / "ml-100k.zip", "ml-100k/u.data", u_data)
    out = convert_archive(archive, "movielens-100k", tmp_path / "ml-100k.inter")
    assert out.read_bytes() == shared
