"""The replica's request log (api.requestlog.RequestLog): JSON lines, written on flush, rotated by size."""

import json

from intentops.api.requestlog import RequestLog


def test_lines_are_buffered_until_flush_and_written_as_json(tmp_path):
    log = RequestLog(tmp_path / "serve" / "replica_x.requests.log", max_lines=3)
    log.add({"path": "/v1/predict", "status": 200, "batch_size": 4})
    log.add({"path": "/v1/feedback", "status": 404})
    assert log.path.read_text() == ""  # nothing written before a flush
    log.add({"path": "/v1/model", "status": 200})  # the third line fills the buffer: written at once
    assert [json.loads(line)["path"] for line in log.path.read_text().splitlines()] == [
        "/v1/predict",
        "/v1/feedback",
        "/v1/model",
    ]
    log.add({"path": "/v1/predict", "status": 422})
    log.close()
    assert json.loads(log.path.read_text().splitlines()[-1]) == {"path": "/v1/predict", "status": 422}


def test_the_file_rotates_past_max_bytes_and_keeps_backup_count_files(tmp_path):
    path = tmp_path / "replica_x.requests.log"
    log = RequestLog(path, max_bytes=100, backup_count=2, max_lines=1)
    for i in range(20):
        log.add({"i": i, "pad": "x" * 40})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.1", f"{path.name}.2"]
    newest_first = [path, path.with_name(f"{path.name}.1"), path.with_name(f"{path.name}.2")]
    seen = [json.loads(line)["i"] for p in reversed(newest_first) for line in p.read_text().splitlines()]
    assert seen == sorted(seen) and seen[-1] == 19  # oldest files dropped, order kept, nothing half-written
