"""flowrl.redact: the credentials of URLs are masked wherever text leaves the process."""

import base64
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flowrl.redact import RedactingFilter, install_redaction, is_secret_key, redact, redact_url
from tests.conftest import ROOT

S = "pw-8c2e"  # the planted password


@pytest.mark.bad_input
@pytest.mark.parametrize("text, expected", [
    (f"http://user:{S}@host:8000", "http://***@host:8000"),
    (f"https://user:{S}@host/p/a?q=1#f", "https://***@host/p/a?q=1#f"),
    (f"http://user:{S}@[::1]:8080/score", "http://***@[::1]:8080/score"),
    (f"http://user:{S}@[2001:db8::7]/", "http://***@[2001:db8::7]/"),
    ("s3://AKIAEXAMPLE:se%2Fcr%40et@bucket/prefix", "s3://***@bucket/prefix"),  # percent-encoded / and @
    (f"http://u:p@{S}@host", "http://***@host"),  # an unescaped @ in the password: up to the last @
    (f"http://{S}@host", "http://***@host"),  # a bare token as the user
    (f"postgresql+psycopg2://mlflow:{S}@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
    (f"reward_url http://a:{S}@h1:1 and tracking 'https://b:{S}@h2/x', s3://c:{S}@bkt/k\nhttp://h3/y",
     "reward_url http://***@h1:1 and tracking 'https://***@h2/x', s3://***@bkt/k\nhttp://h3/y"),
    (f'{{"url": "http://u:{S}@h", "other": "x@y"}}', '{"url": "http://***@h", "other": "x@y"}'),
    (f"https://h/o?X-Amz-Signature={S}&X-Amz-Credential={S}&part=2",
     "https://h/o?X-Amz-Signature=***&X-Amz-Credential=***&part=2"),
    (f"http://h/score?token={S}&my_api_key={S}#x", "http://h/score?token=***&my_api_key=***#x"),
])
def test_userinfo_and_query_credentials_are_masked(text, expected):
    assert redact_url(text) == expected
    assert S not in redact_url(text)
    assert redact_url(redact_url(text)) == redact_url(text)  # idempotent


@pytest.mark.parametrize("text", [
    "http://host:8000/score/t2i", "s3://bucket/prefix/base/0123456789abcdef", "sqlite:///tmp/mlflow.db",
    "file:///data/a@b/c", "models:/shapes-student@champion", "runs:/abc/flowrl_model", "http://host/p/user@x",
    "mail admin@example.com", "http://[::1]:8080/x?design=2&page=3", "grpo.reward_url: null", "", "no url here",
])
def test_text_without_credentials_is_unchanged(text):
    assert redact_url(text) == text


def test_redact_walks_nested_values_and_hides_secret_named_keys():
    value = {"run": {"tracking_uri": f"http://u:{S}@m:5000", "seed": 3, "api_token": S, "password": None},
             "hosts": [f"s3://k:{S}@b/x", ("ok", f"https://t:{S}@h")]}
    out = redact(value)
    assert out == {"run": {"tracking_uri": "http://***@m:5000", "seed": 3, "api_token": "***", "password": None},
                   "hosts": ["s3://***@b/x", ("ok", "https://***@h")]}
    assert S not in repr(out) and value["run"]["api_token"] == S  # a copy: the input is left alone
    assert is_secret_key("AWS_SECRET_ACCESS_KEY") and is_secret_key("reward_token")
    assert not is_secret_key("reward_token_env") and not is_secret_key("tokens")


@pytest.mark.bad_input
def test_every_log_record_is_masked_whichever_logger_makes_it(caplog):
    install_redaction(excepthook=False)
    install_redaction(excepthook=False)  # idempotent: one wrapper
    caplog.set_level(logging.INFO)
    logging.getLogger("flowrl.stages.grpo").info("reward server %s answered", f"http://u:{S}@h:1")
    logging.getLogger("mlflow.store").warning(f"API request to https://u:{S}@m/api failed")
    logging.getLogger("flowrl").info("%d of %s", 3, {"url": f"s3://k:{S}@b"})
    try:
        raise RuntimeError(f"cannot reach http://u:{S}@h:1/score")
    except RuntimeError:
        logging.getLogger("flowrl.rewards.client").exception("scoring failed")
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "http://***@h:1 answered" in text and "https://***@m/api" in text and "s3://***@b" in text
    assert "http://***@h:1/score" in text  # the traceback too
    assert S not in text


def test_the_filter_masks_records_on_a_handler():
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_redact.filter")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("url %s", f"http://u:{S}@h")
    finally:
        logger.removeHandler(handler)
    assert seen == ["url http://***@h"]


@pytest.mark.bad_input
def test_errors_with_a_url_say_it_without_its_credentials():
    from flowrl.config import ConfigError, load_config
    from flowrl.storage import ArtifactError, ArtifactStore, read_manifest

    assert S not in str(ConfigError(f"grpo.reward_url: http://u:{S}@h is bad"))
    with pytest.raises(ArtifactError, match=r"s3://\*\*\*@bucket/x: an artifact URI may not carry credentials") as info:
        ArtifactStore(f"s3://AKIA:{S}@bucket/x")
    assert S not in str(info.value)
    with pytest.raises(ArtifactError, match="may not carry credentials") as info:
        read_manifest(f"https://u:{S}@h/base/0123456789abcdef")
    assert S not in str(info.value)
    with pytest.raises(ConfigError) as info:  # a value of the wrong type, echoed in the error
        load_config(ROOT / "configs" / "smoke.yaml", [f"grpo.reward_url=[http://u:{S}@h]"])
    assert S not in str(info.value) and "***@h" in str(info.value)


class _BasicAuthHealth(BaseHTTPRequestHandler):
    """/health answers 200 only with the basic-auth pair user:p@ss/w (else 401 would count as up too,
    so anything else gets a 500)."""

    def do_GET(self):
        good = "Basic " + base64.b64encode(b"user:p@ss/w").decode()
        self.send_response(200 if self.path == "/health" and self.headers.get("Authorization") == good else 500)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.bad_input
def test_a_tracking_uri_with_userinfo_is_checked_with_basic_auth_and_reported_without_it():
    from flowrl.tracking import TrackingUnavailable, check_reachable

    server = ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        check_reachable(f"http://user:p%40ss%2Fw@127.0.0.1:{port}")  # urllib alone took u:p@... for the host
        with pytest.raises(TrackingUnavailable) as info:
            check_reachable(f"http://user:{S}@127.0.0.1:{port}")
        assert "http://***@127.0.0.1" in str(info.value) and S not in str(info.value)
    finally:
        server.shutdown()
        server.server_close()
