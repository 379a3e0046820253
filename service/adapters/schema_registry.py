"""Writer schemas by id from a Confluent-compatible schema registry, through
``confluent_kafka.schema_registry.SchemaRegistryClient`` (its HTTP client, auth, TLS and cache).

``SchemaRegistryLookup`` is the ``writer_lookup`` of ``codec.EventDecoder``: called with a schema
id, it returns the parsed writer schema or raises
- ``PoisonMessage("unknown_schema")`` when the registry answers that the id does not exist
  (HTTP 404 with a registry error code 404xx: a plain 404, from a proxy or a wrong URL path, is
  a configuration problem, not the record's);
- ``PoisonMessage("incompatible_schema")`` for a schema that is not Avro, uses references, or
  cannot be parsed (``codec.parse_writer_schema``);
- ``SchemaUnavailable`` for everything else: the registry unreachable, timing out, answering
  5xx, 429 or refusing our credentials (401/403). The record is fine; the decoder remembers the
  failure and backs off, and the pipeline reads the record again later.

The client is built with no retries of its own (``max.retries`` 0): a retry would sleep on the
consumer's thread. The decoder's back-off is the retry. URL ``mock://...`` gives confluent's
in-memory registry (tests).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from service.core.codec import ParsedSchema, parse_writer_schema
from service.core.errors import PoisonMessage, SchemaUnavailable


class SchemaRegistryLookup:
    """``schema_id -> parsed writer schema``, from the registry at ``url``.

    Credentials: ``basic_auth_user`` and ``basic_auth_password`` (HTTP basic), or
    ``bearer_token`` (a static bearer token; confluent's client also sends
    ``bearer_logical_cluster`` as ``target-sr-cluster``, which Confluent Cloud needs and other
    registries ignore; ``bearer_identity_pool`` when given). TLS: ``ca_location`` (a CA bundle
    file or directory to verify the registry with; default: the system's), ``cert_location``
    and ``key_location`` (a client certificate, PEM; the key may also be inside the certificate
    file), ``key_password``. ``timeout``: seconds per request (connect and read). ``client``: a
    ready ``SchemaRegistryClient`` (or anything with its ``get_schema``) instead of building one.

    Raises ``ValueError`` for settings that cannot work together (credentials in the URL, both
    basic auth and a bearer token, a key without a certificate, ...) and ``OSError`` (or
    ``ssl.SSLError``) for a CA, certificate or key file that cannot be loaded.
    """

    def __init__(
        self,
        url: str,
        *,
        basic_auth_user: str | None = None,
        basic_auth_password: str | None = None,
        bearer_token: str | None = None,
        bearer_logical_cluster: str = "",
        bearer_identity_pool: str | None = None,
        ca_location: str | None = None,
        cert_location: str | None = None,
        key_location: str | None = None,
        key_password: str | None = None,
        timeout: float = 5.0,
        cache_capacity: int = 1000,
        client: Any = None,
    ) -> None:
        if client is None:
            client = _build_client(
                registry_config(
                    url,
                    basic_auth_user=basic_auth_user,
                    basic_auth_password=basic_auth_password,
                    bearer_token=bearer_token,
                    bearer_logical_cluster=bearer_logical_cluster,
                    bearer_identity_pool=bearer_identity_pool,
                    ca_location=ca_location,
                    cert_location=cert_location,
                    key_location=key_location,
                    key_password=key_password,
                    timeout=timeout,
                    cache_capacity=cache_capacity,
                )
            )
        self._client = client

    @property
    def client(self) -> Any:
        """The ``SchemaRegistryClient`` asked (tests register schemas in a ``mock://`` one)."""
        return self._client

    def __call__(self, schema_id: int) -> ParsedSchema:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            schema = self._client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            status, code = exc.http_status_code, exc.error_code
            if status == 404 and isinstance(code, int) and code // 100 == 404:
                raise PoisonMessage(
                    "unknown_schema", f"schema id {schema_id} is not in the registry"
                ) from None
            raise SchemaUnavailable(
                schema_id,
                f"the schema registry answered HTTP {status} (error code {code})",
                retry_after=0.0,  # no hint: the decoder's back-off decides
            ) from None
        except Exception as exc:  # httpx transport errors (refused, reset, timeout), TLS...
            raise SchemaUnavailable(
                schema_id,
                f"the schema registry cannot be reached: {type(exc).__name__}",
                retry_after=0.0,
            ) from None
        kind = (getattr(schema, "schema_type", None) or "AVRO").upper()
        if kind != "AVRO":
            raise PoisonMessage(
                "incompatible_schema", f"schema id {schema_id} is {kind[:20]}, not Avro"
            )
        if getattr(schema, "references", None):
            raise PoisonMessage(
                "incompatible_schema",
                f"schema id {schema_id} refers to other schemas (not supported)",
            )
        return parse_writer_schema(schema.schema_str)


def registry_config(
    url: str,
    *,
    basic_auth_user: str | None = None,
    basic_auth_password: str | None = None,
    bearer_token: str | None = None,
    bearer_logical_cluster: str = "",
    bearer_identity_pool: str | None = None,
    ca_location: str | None = None,
    cert_location: str | None = None,
    key_location: str | None = None,
    key_password: str | None = None,
    timeout: float = 5.0,
    cache_capacity: int = 1000,
) -> dict[str, Any]:
    """The ``SchemaRegistryClient`` configuration for these settings (see the class)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "mock") or not parts.hostname:
        raise ValueError("the schema registry URL must be http(s)://host[:port][/path]")
    if parts.username is not None or parts.password is not None:
        raise ValueError("give the schema registry's credentials apart, not in its URL")
    if parts.query or parts.fragment or "," in url:
        raise ValueError("the schema registry URL takes no query, fragment or second URL")
    if not timeout > 0:
        raise ValueError("the schema registry timeout must be a positive number of seconds")
    config: dict[str, Any] = {
        "url": url.rstrip("/"),
        "timeout": float(timeout),
        "max.retries": 0,
        "cache.capacity": cache_capacity,
    }
    basic = basic_auth_user is not None or basic_auth_password is not None
    if basic:
        if not basic_auth_user or basic_auth_password is None:
            raise ValueError("schema registry basic auth needs both a user and a password")
        if ":" in basic_auth_user:
            raise ValueError("a schema registry basic-auth user cannot contain ':'")
        config["basic.auth.user.info"] = f"{basic_auth_user}:{basic_auth_password}"
    if bearer_token is not None:
        if basic:
            raise ValueError("give the schema registry basic auth or a bearer token, not both")
        if not bearer_token:
            raise ValueError("the schema registry bearer token is empty")
        config["bearer.auth.credentials.source"] = "STATIC_TOKEN"
        config["bearer.auth.token"] = bearer_token
        config["bearer.auth.logical.cluster"] = bearer_logical_cluster
        if bearer_identity_pool:
            config["bearer.auth.identity.pool.id"] = bearer_identity_pool
    if (key_location or key_password) and not cert_location:
        raise ValueError("a schema registry client key needs its certificate (cert_location)")
    for name, value in (
        ("ssl.ca.location", ca_location),
        ("ssl.certificate.location", cert_location),
        ("ssl.key.location", key_location),
        ("ssl.key.password", key_password),
    ):
        if value:
            config[name] = value
    return config


def _build_client(config: dict[str, Any]) -> Any:
    from confluent_kafka.schema_registry import SchemaRegistryClient

    # ``new_client`` gives confluent's in-memory registry for ``mock://`` URLs (tests).
    return SchemaRegistryClient.new_client(config)
