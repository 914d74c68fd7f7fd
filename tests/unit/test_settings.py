from pathlib import Path

import pytest

from sendtrail.settings import Settings, SettingsError


def test_defaults_match_the_spec():
    s = Settings.from_env({})
    assert s.kafka == "localhost:9092"
    assert s.clickhouse_url == "chdb://./data/clickhouse"
    assert s.topic_prefix == "sendtrail."
    assert s.data_dir == Path("./data")
    assert s.web_port == 6066
    assert s.api_token is None
    assert s.topic("enrollments") == "sendtrail.enrollments"


def test_reads_every_documented_variable():
    env = {
        "SENDTRAIL_KAFKA": "127.0.0.1:19092,127.0.0.1:19093",
        "SENDTRAIL_CLICKHOUSE_URL": "http://u:p@127.0.0.1:8123/db",
        "SENDTRAIL_TOPIC_PREFIX": "t1.",
        "SENDTRAIL_PARTITIONS": "8",
        "SENDTRAIL_DATA_DIR": "/tmp/x",
        "SENDTRAIL_WEB_PORT": "0",
        "SENDTRAIL_API_TOKEN": "secret",
        "SENDTRAIL_SENDGRID_PUBLIC_KEY": "MFkw",
        "SENDTRAIL_MAILGUN_SIGNING_KEY": "key",
        "SENDTRAIL_POSTMARK_AUTH": "user:pw",
        "SENDTRAIL_SES_CERT_FILE": "/tmp/cert.pem",
    }
    s = Settings.from_env(env)
    assert s.partitions == 8 and s.web_port == 0 and s.api_token == "secret"
    assert s.data_dir == Path("/tmp/x") and s.ses_cert_file == Path("/tmp/cert.pem")
    assert not s.embedded_clickhouse
    assert s.postmark_auth == "user:pw"


@pytest.mark.parametrize("env, fragment", [
    ({"SENDTRAIL_PARTITONS": "4"}, "unknown setting(s) SENDTRAIL_PARTITONS"),
    ({"SENDTRAIL_PARTITIONS": "four"}, "expected an integer"),
    ({"SENDTRAIL_PARTITIONS": "0"}, "from 1 to"),
    ({"SENDTRAIL_WEB_PORT": "70000"}, "from 0 to 65535"),
    ({"SENDTRAIL_CLICKHOUSE_URL": "postgres://x"}, "expected chdb://PATH"),
    ({"SENDTRAIL_KAFKA": "localhost"}, "expected host:port"),
    ({"SENDTRAIL_TOPIC_PREFIX": "a/b"}, "TOPIC_PREFIX"),
    ({"SENDTRAIL_POSTMARK_AUTH": "nocolon"}, "user:password"),
    ({"SENDTRAIL_MIGRATE_ON_START": "maybe"}, "expected true or false"),
    ({"SENDTRAIL_LOG_LEVEL": "warning"}, "expected crit, error, warn, info or debug"),
])
def test_bad_settings_are_refused_with_a_clear_message(env, fragment):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert fragment in str(err.value)


def test_unrelated_variables_are_ignored():
    assert Settings.from_env({"PATH": "/bin", "SENDTRAILX": "1"}).partitions == 4
