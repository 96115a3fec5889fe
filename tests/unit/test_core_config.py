"""Configuration parsing (peernet/config.py): types, booleans, bad values, external flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from peernet.config import ENV_VARS, ConfigError, PeerNetConfig, load_config


def test_no_variables_give_the_defaults() -> None:
    assert load_config({}) == PeerNetConfig()


def test_every_variable_names_an_existing_field() -> None:
    cfg = PeerNetConfig()
    for var, (section, name) in ENV_VARS.items():
        assert var.startswith("PEERNET_")
        assert hasattr(getattr(cfg, section), name), var


def test_values_are_parsed_to_the_field_types() -> None:
    cfg = load_config({
        "PEERNET_PORT": "9001",
        "PEERNET_RATE_PER_S": "12.5",
        "PEERNET_HELLO_TIMEOUT_S": "0.25",
        "PEERNET_HOME": "/srv/peernet-home",
        "PEERNET_EVENTS_TOPIC": "t.events",
        "PEERNET_SESSION_SHARDS": "4",
    })
    assert cfg.gateway.port == 9001 and isinstance(cfg.gateway.port, int)
    assert cfg.gateway.rate_per_s == 12.5
    assert cfg.gateway.hello_timeout_s == 0.25
    assert cfg.stack.home == Path("/srv/peernet-home")
    assert cfg.topics.events == "t.events"
    assert cfg.shards.session_shards == 4
    # Untouched fields keep their defaults.
    assert cfg.gateway.rate_burst == PeerNetConfig().gateway.rate_burst


def test_a_float_field_takes_an_integer_string() -> None:
    assert load_config({"PEERNET_RATE_PER_S": "200"}).gateway.rate_per_s == 200.0


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_true_booleans(raw: str) -> None:
    assert load_config({"PEERNET_DEV_TOKENS": raw}).gateway.dev_tokens is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "no", "off", ""])
def test_false_booleans(raw: str) -> None:
    assert load_config({"PEERNET_DEV_TOKENS": raw}).gateway.dev_tokens is False


@pytest.mark.parametrize(("var", "raw"), [
    ("PEERNET_PORT", "eighty"),
    ("PEERNET_PORT", "80.5"),
    ("PEERNET_PORT", ""),
    ("PEERNET_RATE_PER_S", "fast"),
    ("PEERNET_DEV_TOKENS", "maybe"),
    ("PEERNET_SESSION_SHARDS", "2x"),
])
def test_a_bad_value_is_a_config_error_naming_the_variable(var: str, raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({var: raw})
    assert var in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(("var", "flag"), [
    ("PEERNET_KAFKA_BOOTSTRAP", "kafka_external"),
    ("PEERNET_REDIS_URL", "redis_external"),
    ("PEERNET_MONGO_URL", "mongo_external"),
])
def test_a_service_given_by_its_variable_is_external(var: str, flag: str) -> None:
    cfg = load_config({var: "somewhere:1234"})
    assert getattr(cfg.services, flag) is True
    address = {"kafka_external": "kafka_bootstrap", "redis_external": "redis_url",
               "mongo_external": "mongo_url"}[flag]
    assert getattr(cfg.services, address) == "somewhere:1234"
    others = {"kafka_external", "redis_external", "mongo_external"} - {flag}
    assert not any(getattr(cfg.services, f) for f in others)
    assert not any(getattr(load_config({}).services, f) for f in others | {flag})


def test_the_stack_port_does_not_make_a_service_external() -> None:
    cfg = load_config({"PEERNET_STACK_REDIS_PORT": "6390"})
    assert cfg.stack.redis_port == 6390
    assert cfg.services.redis_external is False
    # A service of the local stack is reached on the stack's port.
    assert cfg.services.redis_url == "redis://127.0.0.1:6390/0"


def test_a_home_under_tilde_is_expanded() -> None:
    assert load_config({"PEERNET_HOME": "~/peernet-home"}).stack.home == (
        Path("~/peernet-home").expanduser())


def test_an_empty_service_variable_keeps_the_default_address() -> None:
    cfg = load_config({"PEERNET_REDIS_URL": ""})
    assert cfg.services.redis_external is False
    assert cfg.services.redis_url == PeerNetConfig().services.redis_url


def test_the_config_is_frozen() -> None:
    cfg = load_config({})
    with pytest.raises(AttributeError):
        cfg.gateway.port = 1


def test_kafka_tls_settings_apply_to_an_external_kafka() -> None:
    tls = {"PEERNET_KAFKA_SECURITY_PROTOCOL": "ssl", "PEERNET_KAFKA_SSL_CAFILE": "/etc/ca.pem"}
    s = load_config({"PEERNET_KAFKA_BOOTSTRAP": "kafka.example:9093", **tls}).services
    assert (s.kafka_security_protocol, s.kafka_ssl_cafile) == ("SSL", "/etc/ca.pem")
    # The local stack's broker is plaintext, whatever the variable says.
    assert load_config(tls).services.kafka_security_protocol == "PLAINTEXT"


def test_an_unknown_kafka_security_protocol_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PEERNET_KAFKA_SECURITY_PROTOCOL"):
        load_config({"PEERNET_KAFKA_BOOTSTRAP": "k:9092",
                     "PEERNET_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})


@pytest.mark.parametrize("var", ["PEERNET_FEED_LINGER_MS", "PEERNET_PROJECTOR_LINGER_MS"])
def test_a_consumer_linger_beyond_the_fetch_timeout_is_refused(var: str) -> None:
    assert load_config({var: "2000"})  # the bound itself is allowed
    with pytest.raises(ConfigError, match=var):
        load_config({var: "5000"})
    with pytest.raises(ConfigError, match=var):
        load_config({var: "-1"})


def test_the_gateway_producer_linger_is_bounded() -> None:
    assert load_config().gateway.kafka_linger_ms == 2
    assert load_config({"PEERNET_GATEWAY_LINGER_MS": "0"}).gateway.kafka_linger_ms == 0
    assert load_config({"PEERNET_GATEWAY_LINGER_MS": "50"}).gateway.kafka_linger_ms == 50
    for bad in ("51", "-1"):
        with pytest.raises(ConfigError, match="PEERNET_GATEWAY_LINGER_MS"):
            load_config({"PEERNET_GATEWAY_LINGER_MS": bad})
