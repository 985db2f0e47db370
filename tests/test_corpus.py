"""fetch_oscar: streaming sources, cleaning counts, held-out split, budget, clear errors."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saelab.data import corpus
from saelab.core.config import parse_params
from saelab.data.corpus import (fetch_corpus, group_key, heldout_groups, iter_documents,
                                read_manifest)
from saelab.core.errors import SaelabError


def _params(**data):
    return parse_params({"data": data})


def _local(tmp_path, pattern="in/*", **data):
    return _params(source="local", local_files=str(tmp_path / pattern), **data)


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")


def _docs(n, length=200, prefix="doc"):
    return [{"id": f"{prefix}{i}", "text": f"{prefix} {i} " + "palabra " * (length // 8)}
            for i in range(n)]


def _all(out, split):
    return list(iter_documents(out, split))


def test_broken_input_is_counted_not_crashed(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a_empty.jsonl").write_bytes(b"")
    (src / "b_blank.jsonl").write_bytes(b"  \n\n\t\n")
    good = _docs(5)
    big = "x" * (5 * 1024 * 1024)  # one 5 MB document
    _write_jsonl(src / "c_mixed.jsonl", good + [
        {"id": "ws1", "text": "   "}, {"id": "ws2", "text": "\n\t \n"},
        {"id": "empty", "text": ""}, {"id": "notext"},
        {"id": "dup", "text": good[0]["text"]},
        {"id": "big", "text": big},
    ])
    # A line carrying raw bytes that are not UTF-8, between two good lines.
    with open(src / "d_bytes.jsonl", "wb") as f:
        f.write(b'{"id": "ok1", "text": "buenos d\xc3\xadas"}\n')
        f.write(b'{"id": "bad", "text": "ma\xff\xfe\xc3al"}\n')
        f.write(b'{"id": "ok2", "text": "hasta ma\xc3\xb1ana"}\n')
    out = tmp_path / "corpus"
    m = fetch_corpus(_local(tmp_path, max_doc_chars=10_000, heldout_fraction=0.0), out)

    assert m["empty_files"] == 2
    assert m["dropped"] == {"not_text": 1, "invalid_utf8": 1, "empty": 1, "whitespace_only": 2,
                            "duplicate": 1}
    assert m["cut"] == {"docs": 1, "chars_removed": len(big) - 10_000, "max_doc_chars": 10_000}
    assert m["records_read"] == 5 + 6 + 3
    docs = dict(_all(out, "train"))
    assert set(docs) == {d["id"] for d in good} | {"big", "ok1", "ok2"}
    assert len(docs["big"]) == 10_000 and docs["ok2"] == "hasta mañana"
    assert m["docs"] == {"train": 8, "heldout": 0}
    assert m["chars"]["train"] == sum(len(t) for t in docs.values())
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-00000.parquet"]


def test_invalid_json_gives_a_clear_error_naming_the_file(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "broken.jsonl").write_text('{"text": "hola"}\n{"text": "sin cerrar\n', encoding="utf-8")
    with pytest.raises(SaelabError, match=r"broken\.jsonl cannot be read as json.*fix or remove"):
        fetch_corpus(_local(tmp_path), tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()


def test_heldout_split_is_deterministic_disjoint_and_order_free(tmp_path):
    docs = _docs(120)
    _write_jsonl(tmp_path / "in" / "a.jsonl", docs)
    params = _local(tmp_path, heldout_fraction=0.25, shard_docs=16)
    m1 = fetch_corpus(params, tmp_path / "c1")
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    _write_jsonl(tmp_path / "in" / "a.jsonl", shuffled)
    m2 = fetch_corpus(params, tmp_path / "c2")

    train = {i for i, _ in _all(tmp_path / "c1", "train")}
    held = {i for i, _ in _all(tmp_path / "c1", "heldout")}
    assert train.isdisjoint(held) and train | held == {d["id"] for d in docs}
    assert held == set(m1["heldout"]["doc_ids"])
    # Without a url or source, each document is its own group; one document each: exact.
    chosen = heldout_groups({f"doc:{d['id']}": 1 for d in docs}, 0.25)
    assert held == {g.removeprefix("doc:") for g in chosen} and len(held) == 30
    assert m1["heldout"]["n_groups"] == 30 and m1["heldout"]["groups_total"] == 120
    assert set(m2["heldout"]["doc_ids"]) == held  # membership depends on the id, not the order
    assert len(m1["shards"]["train"]) == -(-len(train) // 16)
    # Reading back is deterministic and in written order.
    assert _all(tmp_path / "c1", "train") == _all(tmp_path / "c1", "train")
    assert [i for i, _ in _all(tmp_path / "c1", "train")] == [
        d["id"] for d in docs if d["id"] in train]


def _split_groups(out, split):
    m = read_manifest(out)
    return [g for name in m["shards"][split] for g in pq.read_table(out / name)["group"].to_pylist()]


def test_sample_holds_out_whole_novels(tmp_path, repo_root):
    sample = repo_root / "data/sample/spanish_novels_cligs.jsonl"
    m = fetch_corpus(_params(source="sample", sample_path=str(sample)), tmp_path / "c")
    # The novel of a chunk, from its id (ne0174-0000: novel ne0174), not from group_key.
    novel = lambda doc_id: doc_id.split("-")[0]  # noqa: E731
    train = {novel(i) for i, _ in _all(tmp_path / "c", "train")}
    held = {novel(i) for i, _ in _all(tmp_path / "c", "heldout")}
    assert len(train | held) == 13 and held and train.isdisjoint(held)  # 13/13 leaked before
    assert set(_split_groups(tmp_path / "c", "train")).isdisjoint(
        _split_groups(tmp_path / "c", "heldout"))
    h = m["heldout"]
    assert h["groups_total"] == 13 and h["n_groups"] == len(h["groups"]) == len(held)
    assert all(g.startswith("work:es_") for g in h["groups"])
    assert {g.removesuffix(".txt").rsplit("-", 1)[1] for g in h["groups"]} == held
    # About data.heldout_fraction = 0.05 of the documents: one whole novel is 3-16 %.
    assert 0.02 < m["docs"]["heldout"] / sum(m["docs"].values()) < 0.2


def test_web_documents_are_grouped_by_site():
    assert group_key("a", {"url": "https://www.Example.es/x?q=1"}) == "domain:example.es"
    assert group_key("a", {"metadata": {"url": "http://blog.ejemplo.org/p"}}) == \
        "domain:blog.ejemplo.org"
    assert group_key("a", {"url": "https://ejemplo.org", "source": "cc"}) == "domain:ejemplo.org"
    assert group_key("a", {"source": "es_Galdos_Tristana-ne0001.txt"}) == \
        "work:es_Galdos_Tristana-ne0001.txt"
    assert group_key("a", {"url": "", "metadata": "{}"}) == "doc:a"


def test_heldout_takes_whole_sites_and_keeps_one_for_training(tmp_path):
    sites = [f"site{k}.es" for k in range(10)]
    docs = [{"id": f"d{i}", "url": f"https://{sites[i % 10]}/p{i}", "text": d["text"]}
            for i, d in enumerate(_docs(200))]
    _write_jsonl(tmp_path / "in" / "a.jsonl", docs)
    m = fetch_corpus(_local(tmp_path, heldout_fraction=0.25), tmp_path / "c")
    site = {d["id"]: d["url"].split("/")[2] for d in docs}
    train = {site[i] for i, _ in _all(tmp_path / "c", "train")}
    held = {site[i] for i, _ in _all(tmp_path / "c", "heldout")}
    assert train.isdisjoint(held) and len(train | held) == 10
    assert len(held) == 3 and m["docs"]["heldout"] == 60  # 20 each: the first 3 reach 25 %
    # Even a fraction that would take every group leaves one to train on, and a tiny one
    # still holds one out.
    assert len(heldout_groups({s: 20 for s in sites}, 0.5)) == 5
    assert len(heldout_groups({"a": 1, "b": 1}, 0.5)) == 1
    assert len(heldout_groups({s: 20 for s in sites}, 0.001)) == 1
    assert heldout_groups({s: 20 for s in sites}, 0.0) == []


def test_one_work_cannot_be_split_by_work(tmp_path):
    docs = [{"id": f"ne0001-{i:04d}", "source": "es_Galdos_Tristana-ne0001.txt", "text": d["text"]}
            for i, d in enumerate(_docs(10))]
    _write_jsonl(tmp_path / "in" / "a.jsonl", docs)
    with pytest.raises(SaelabError, match=r"data.heldout_fraction = 0.05 needs two source works"
                                          r".*work:es_Galdos.*heldout_fraction = 0"):
        fetch_corpus(_local(tmp_path), tmp_path / "c")
    assert not (tmp_path / "c").exists()
    m = fetch_corpus(_local(tmp_path, heldout_fraction=0.0), tmp_path / "c")
    assert m["docs"] == {"train": 10, "heldout": 0}


def test_seeded_order_is_a_permutation_of_the_whole_split(tmp_path):
    _write_jsonl(tmp_path / "in" / "a.jsonl", _docs(300))
    fetch_corpus(_local(tmp_path, heldout_fraction=0.0, shard_docs=64), tmp_path / "c")
    in_file_order = _all(tmp_path / "c", "train")
    a = list(iter_documents(tmp_path / "c", "train", seed=0))
    assert a == list(iter_documents(tmp_path / "c", "train", seed=0))
    assert sorted(a) == sorted(in_file_order) and a != in_file_order
    assert a != list(iter_documents(tmp_path / "c", "train", seed=1))
    # The first tenth already reaches into every fifth of the file (5 shards of 64).
    position = {doc_id: k for k, (doc_id, _) in enumerate(in_file_order)}
    assert {position[doc_id] * 5 // 300 for doc_id, _ in a[:30]} == set(range(5))
    assert list(iter_documents(tmp_path / "c", "heldout", seed=0)) == []


def test_token_budget_and_max_docs_stop_reading_early(tmp_path):
    _write_jsonl(tmp_path / "in" / "a.jsonl", _docs(200, length=1000))
    m = fetch_corpus(_local(tmp_path, token_budget=10_000, chars_per_token=4.0), tmp_path / "c")
    total_chars = sum(m["chars"].values())
    assert m["stopped_by"] == "token_budget"
    assert 40_000 <= total_chars < 40_000 + 1100
    assert m["records_read"] == sum(m["docs"].values()) < 200
    m = fetch_corpus(_local(tmp_path, max_docs=7), tmp_path / "c")
    assert (m["stopped_by"], sum(m["docs"].values()), m["records_read"]) == ("max_docs", 7, 7)


def test_parquet_local_source(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    docs = _docs(30)
    pq.write_table(pa.table({"text": [d["text"] for d in docs]}), src / "a.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), src / "b.parquet")
    m = fetch_corpus(_local(tmp_path, heldout_fraction=0.0), tmp_path / "c")
    assert m["docs"]["train"] == 30 and m["empty_files"] == 1
    # Without an id column, the id is the file and row.
    assert _all(tmp_path / "c", "train")[3] == ("a.parquet:3", docs[3]["text"])


def test_corrupt_parquet_gives_a_clear_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SaelabError, match=r"x\.parquet is not a readable parquet file"):
        fetch_corpus(_local(tmp_path), tmp_path / "c")


def test_empty_corpus_names_source_and_fix_and_keeps_the_previous_corpus(tmp_path):
    _write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": f"documento {i}"} for i in range(20)])
    good = fetch_corpus(_local(tmp_path), tmp_path / "c")
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    _write_jsonl(tmp_path / "in" / "a.jsonl", [{"text": " "}, {"text": ""}])
    with pytest.raises(SaelabError, match=r"data.source = local: no training documents.*"
                                          r"whitespace_only.*data.local_files"):
        fetch_corpus(_local(tmp_path), tmp_path / "c")
    # The failed fetch left the finished corpus as it was, and no half-written copy.
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    assert read_manifest(tmp_path / "c") == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "in"]
    with pytest.raises(SaelabError, match="matches no files"):
        fetch_corpus(_local(tmp_path, pattern="nothing/*.jsonl"), tmp_path / "c")


def test_shipped_sample_first_records(tmp_path, repo_root):
    lines = (repo_root / "data/sample/spanish_novels_cligs.jsonl").read_text(
        encoding="utf-8").splitlines()[:50]
    sample = tmp_path / "sample.jsonl"
    sample.write_text("\n".join(lines) + "\n", encoding="utf-8")
    m = fetch_corpus(_params(source="sample", sample_path=str(sample)), tmp_path / "c")
    ids = [json.loads(x)["id"] for x in lines]
    assert m["source"] == "sample" and m["records_read"] == 50
    assert sum(m["docs"].values()) == 50 and sum(m["dropped"].values()) == 0
    got = [i for i, _ in _all(tmp_path / "c", "train")] + m["heldout"]["doc_ids"]
    assert sorted(got) == sorted(ids) and got[0] == "ne0174-0000"
    assert m["tokens_estimate"]["train"] == round(m["chars"]["train"] / 3.3)


def test_iter_documents_without_corpus_says_which_stage(tmp_path):
    with pytest.raises(SaelabError, match="dvc repro fetch_oscar"):
        next(iter_documents(tmp_path))


class _FakeHub:
    """Records what the Hub routes ask `datasets` for; serves records from memory."""

    def __init__(self, monkeypatch, records):
        import datasets
        import huggingface_hub

        self.calls = []
        test = self

        class Info:
            sha = "a" * 40

        def dataset_info(self_api, repo, revision=None, token=None):
            test.calls.append(("dataset_info", repo, revision, token))
            return Info()

        def load_dataset(path, **kwargs):
            test.calls.append(("load_dataset", path, kwargs))
            return iter(records)

        monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
        monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_oscar_route_streams_the_parquet_export(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = _FakeHub(monkeypatch, [{"id": i, "text": d["text"]} for i, d in enumerate(_docs(20))])
    m = fetch_corpus(_params(source="oscar", max_docs=10), tmp_path / "c")
    _, repo, revision, token = hub.calls[0]
    assert (repo, revision) == ("oscar-corpus/oscar", "refs/convert/parquet")
    assert token == "hf_test_token"
    _, path, kwargs = hub.calls[1]
    assert path == "oscar-corpus/oscar"
    assert kwargs == {"revision": "a" * 40, "split": "train", "streaming": True,
                      "token": "hf_test_token",
                      "data_files": "unshuffled_deduplicated_es/partial-train/*.parquet"}
    assert (m["repo"], m["revision"], m["revision_sha"]) == (
        "oscar-corpus/oscar", "refs/convert/parquet", "a" * 40)
    assert sum(m["docs"].values()) == 10 and m["stopped_by"] == "max_docs"
    assert "hf_test_token" not in (tmp_path / "c" / "manifest.json").read_text()


def test_fineweb2_route_uses_the_language_config(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = _FakeHub(monkeypatch, [{"id": f"<urn:{i}>", "text": d["text"]}
                                 for i, d in enumerate(_docs(5))])
    m = fetch_corpus(_params(source="fineweb2"), tmp_path / "c")
    _, path, kwargs = hub.calls[1]
    assert path == "HuggingFaceFW/fineweb-2" and kwargs["name"] == "spa_Latn"
    assert kwargs["streaming"] is True and kwargs["token"] is None
    assert m["config"] == "spa_Latn" and sum(m["docs"].values()) == 5


def test_oscar_without_token_fails_before_any_request(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = _FakeHub(monkeypatch, [])
    with pytest.raises(SaelabError, match=r"HF_TOKEN is not set.*oscar-corpus/oscar"):
        fetch_corpus(_params(source="oscar"), tmp_path / "c")
    assert hub.calls == [] and not (tmp_path / "c").exists()


def test_gated_dataset_error_is_one_clear_line(tmp_path, monkeypatch, gated_repo):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", gated_repo(
        "https://huggingface.co/api/datasets/oscar-corpus/oscar"))
    with pytest.raises(SaelabError, match=r"oscar-corpus/oscar is gated.*accept its terms"):
        fetch_corpus(_params(source="oscar"), tmp_path / "c")


def test_manifest_counts_are_logged_as_metrics(tmp_path, monkeypatch):
    logged = {}
    monkeypatch.setattr("saelab.core.tracking.log_metrics", lambda m, step=None: logged.update(m))
    monkeypatch.setattr("saelab.core.tracking.log_artifact", lambda *a, **k: None)
    monkeypatch.setattr(corpus.paths, "CORPUS_DIR", tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "in" / "a.jsonl", _docs(4) + [{"text": ""}])
    corpus._run(_local(tmp_path, local_dir=str(tmp_path / "in")))
    assert logged["corpus"]["dropped"]["empty"] == 1
    assert sum(logged["corpus"]["docs"].values()) == 4


def test_local_files_must_lie_where_dvc_watches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus.check_watched(_params(source="local", local_files="data/local/**/*.jsonl").data)
    corpus.check_watched(_params(source="local", local_files="in/a.jsonl", local_dir="in").data)
    with pytest.raises(SaelabError, match=r"data.local_files = 'in/\*.jsonl' lies outside "
                                          r"data.local_dir = 'data/local'.*set data.local_dir"):
        corpus.check_watched(_params(source="local", local_files="in/*.jsonl").data)
    with pytest.raises(SaelabError, match="lies outside"):
        corpus.check_watched(_params(source="local",
                                     local_files=str(tmp_path.parent / "x/*.jsonl")).data)
