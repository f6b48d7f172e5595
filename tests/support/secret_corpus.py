"""The redaction corpus: synthetic, format-valid secrets of many providers (none is real).

Each :class:`Sample` is a secret (``needle``: what must never be stored, in any encoding) in the
context it usually appears in (``context``: an env line, a header, a connection string, a URL).
Values are drawn from a seeded generator with each format's documented prefix, alphabet and
length, so they look like the real thing to any detector but grant nothing.

:func:`placements` puts a context where tool calls carry it: a top-level argument, a nested
object, an array, an error text, JSON-escaped inside a string, %-encoded in a URL and wrapped in
base64.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

_R = random.Random(20261205)
LOWER = string.ascii_lowercase
UPPER = string.ascii_uppercase
DIGITS = string.digits
ALNUM = LOWER + UPPER + DIGITS
HEX = "0123456789abcdef"
B64 = ALNUM + "+/"
URLSAFE = ALNUM + "_-"


def r(alphabet: str, n: int) -> str:
    return "".join(_R.choice(alphabet) for _ in range(n))


def b64(n_bytes: int) -> str:
    return base64.b64encode(bytes(_R.getrandbits(8) for _ in range(n_bytes))).decode()


def _aws_secret() -> str:
    while True:  # 40 random base64 characters, as AWS issues them
        value = r(B64, 40)
        if (
            sum(c.isupper() for c in value) >= 2
            and sum(c.islower() for c in value) >= 2
            and any(c.isdigit() for c in value)
            and not value.startswith("/")
        ):
            return value


@dataclass(frozen=True)
class Sample:
    format: str
    needle: str
    context: str


def _s(fmt: str, needle: str, context: Callable[[str], str] | str = "{}") -> Sample:
    text = context(needle) if callable(context) else context.format(needle)
    return Sample(fmt, needle, text)


_AZ_KEY = b64(64)
_PEM_BODY = b64(48)
_JWT = (
    base64.urlsafe_b64encode(b'{"alg":"RS256","typ":"JWT"}').rstrip(b"=").decode()
    + "."
    + base64.urlsafe_b64encode(json.dumps({"sub": "svc-" + r(LOWER, 6), "exp": 1893456000}).encode())
    .rstrip(b"=")
    .decode()
    + "."
    + r(URLSAFE, 43)
)

SAMPLES: tuple[Sample, ...] = (
    # key material and generic structures
    _s(
        "pem_rsa_private_key",
        _PEM_BODY,
        "-----BEGIN RSA PRIVATE KEY-----\n{}\n" + b64(48) + "\n-----END RSA PRIVATE KEY-----",
    ),
    _s("pem_pkcs8_private_key", b64(48), "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----"),
    _s(
        "openssh_private_key",
        b64(48),
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA{}\n-----END OPENSSH PRIVATE KEY-----",
    ),
    _s(
        "pgp_private_key_block",
        b64(48),
        "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF{}\n-----END PGP PRIVATE KEY BLOCK-----",
    ),
    _s("putty_private_key", b64(48), "PuTTY-User-Key-File-3: ssh-rsa\nPrivate-Lines: 1\n{}\nPrivate-MAC: 0a1b"),
    _s("age_secret_key", "AGE-SECRET-KEY-1" + r("QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L", 58), "identity: {}"),
    _s("jwt", _JWT, "token {}"),
    _s("dsn_postgres", "pg-" + r(ALNUM, 14), "postgres://app:{}@db.internal:5432/orders"),
    _s(
        "dsn_postgres_one_slash",
        "pg1-" + r(ALNUM, 12),
        "could not connect: postgres:/app:{}@db.internal:5432/orders: connection refused",
    ),
    _s("dsn_mysql", "my-" + r(ALNUM, 12), "mysql://root:{}@mysql:3306/shop"),
    _s("dsn_mongodb_srv", "mg-" + r(ALNUM, 14), "mongodb+srv://reader:{}@cluster0.example.mongodb.net/db"),
    _s("dsn_redis_no_user", "rd-" + r(ALNUM, 12), "redis://:{}@cache:6379/0"),
    _s("dsn_amqp_one_slash", "mq-" + r(ALNUM, 12), "amqp:/guest:{}@rabbit:5672/vhost"),
    _s("url_basic_auth", "u-" + r(ALNUM, 12), "https://deploy:{}@git.example.com/acme/web.git"),
    _s("url_token_as_user", "ghp_" + r(ALNUM, 36), "https://{}:x-oauth-basic@github.com/acme/web.git"),
    _s("jdbc_password_param", "jd-" + r(ALNUM, 12), "jdbc:mysql://db:3306/app?user=app&password={}"),
    _s("ado_net_connection_string", "Ad0-" + r(ALNUM, 12), "Server=tcp:sql,1433;User ID=app;Pwd={};Encrypt=True"),
    _s("libpq_keyword_dsn", "kv-" + r(ALNUM, 12), "host=db port=5432 user=app password={} dbname=orders"),
    _s("bearer_header", r(URLSAFE, 32), "Authorization: Bearer {}"),
    _s("basic_header", base64.b64encode(b"svc:" + r(ALNUM, 16).encode()).decode(), "Authorization: Basic {}"),
    _s("authorization_token_scheme", r(ALNUM, 40), "Authorization: token {}"),
    _s("okta_ssws", "00" + r(URLSAFE, 40), "Authorization: SSWS {}"),
    _s("x_api_key_header", r(ALNUM, 32), "X-Api-Key: {}"),
    _s("env_password", "pw-" + r(ALNUM, 12), "DB_PASSWORD={}"),
    _s("yaml_password", "yml-" + r(ALNUM, 12), "database:\n  password: {}\n  host: db"),
    _s("json_client_secret", r(ALNUM, 24), '{{"client_id": "web", "client_secret": "{}"}}'),
    _s("gcp_service_account_key_id", r(HEX, 40), '{{"type": "service_account", "private_key_id": "{}"}}'),
    # cloud
    _s("aws_access_key_id", "AKIA" + r(UPPER + DIGITS, 16), "aws_access_key_id = {}"),
    _s("aws_sts_access_key_id", "ASIA" + r(UPPER + DIGITS, 16), "AccessKeyId: {}"),
    _s("aws_secret_access_key_named", _aws_secret(), "AWS_SECRET_ACCESS_KEY={}"),
    _s("aws_secret_access_key_bare", _aws_secret(), "the key is {} (rotate it)"),
    _s("aws_secret_access_key_credentials_file", _aws_secret(), "[default]\naws_secret_access_key = {}"),
    _s(
        "aws_presigned_url_signature",
        r(HEX, 64),
        "https://bucket.s3.amazonaws.com/a.csv?X-Amz-Credential=x&X-Amz-Signature={}",
    ),
    _s(
        "azure_storage_connection_string",
        _AZ_KEY,
        "DefaultEndpointsProtocol=https;AccountName=acmedata;AccountKey={};EndpointSuffix=core.windows.net",
    ),
    _s(
        "azure_sas_signature",
        quote(b64(32), safe=""),
        "https://acmedata.blob.core.windows.net/c/a.txt?sv=2022-11-02&se=2026-12-31&sr=b&sp=r&sig={}",
    ),
    _s(
        "azure_servicebus_shared_access_key",
        b64(32),
        "Endpoint=sb://acme.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey={}",
    ),
    _s("azure_storage_key_identifiable", r(B64, 76) + "+ASt" + r(B64, 6) + "==", "key1 {}"),
    _s("azure_devops_pat", r(ALNUM, 76) + "AZDO" + r(ALNUM, 4), "ADO_TOKEN {}"),
    _s("azure_entra_client_secret", r(URLSAFE, 3) + "8Q~" + r(ALNUM + "_~.-", 34), "client secret {}"),
    _s("gcp_api_key", "AIza" + r(URLSAFE, 35), "https://maps.googleapis.com/maps/api?key={}"),
    _s("gcp_oauth_client_secret", "GOCSPX-" + r(URLSAFE, 28), "oauth {}"),
    _s("google_oauth_access_token", "ya29." + r(URLSAFE, 120), "access {}"),
    _s("google_oauth_refresh_token", "1//0" + r(URLSAFE, 100), "refresh {}"),
    _s("digitalocean_pat", "dop_v1_" + r(HEX, 64), "DIGITALOCEAN_ACCESS_TOKEN {}"),
    _s("heroku_api_key", "HRKU-" + r(URLSAFE, 60), "heroku {}"),
    _s("alibaba_access_key_id", "LTAI" + r(ALNUM, 20), "aliyun {}"),
    # source hosting, registries, CI
    _s("github_classic_pat", "ghp_" + r(ALNUM, 36), "git push with {}"),
    _s("github_fine_grained_pat", "github_pat_" + r(ALNUM, 22) + "_" + r(ALNUM, 59), "GH {}"),
    _s("github_app_installation_token", "ghs_" + r(ALNUM, 36), "{}"),
    _s("gitlab_pat", "glpat-" + r(URLSAFE, 20), "GITLAB {}"),
    _s("gitlab_deploy_token", "gldt-" + r(URLSAFE, 20), "{}"),
    _s("gitlab_runner_token", "glrt-" + r(URLSAFE, 20), "{}"),
    _s("atlassian_api_token", "ATATT3" + r(URLSAFE, 180), "jira {}"),
    _s("bitbucket_app_password", "ATBB" + r(ALNUM, 32), "bb {}"),
    _s("npm_token", "npm_" + r(ALNUM, 36), "//registry.npmjs.org/:_authToken={}"),
    _s("pypi_token", "pypi-AgEIcHlwaS5vcmc" + r(URLSAFE, 70), "[pypi]\nusername = __token__\nthe token below\n{}"),
    _s("rubygems_api_key", "rubygems_" + r(HEX, 48), "GEM_HOST_API_KEY {}"),
    _s("nuget_api_key", "oy2" + r(LOWER + DIGITS, 43), "nuget push -k {}"),
    _s("docker_hub_pat", "dckr_pat_" + r(URLSAFE, 27), "docker login -p {}"),
    _s("artifactory_api_key", "AKCp" + r(ALNUM, 69), "jfrog {}"),
    _s("terraform_cloud_token", r(ALNUM, 14) + ".atlasv1." + r(URLSAFE, 67), "TFE {}"),
    _s("vault_service_token", "hvs." + r(URLSAFE, 90), "VAULT {}"),
    _s("pulumi_token", "pul-" + r(HEX, 40), "pulumi {}"),
    _s("doppler_token", "dp.st." + r(ALNUM, 43), "doppler {}"),
    _s("databricks_pat", "dapi" + r(HEX, 32), "databricks {}"),
    _s("sentry_org_token", "sntrys_" + r(B64, 60), "sentry {}"),
    _s("grafana_service_account_token", "glsa_" + r(ALNUM, 32) + "_" + r(HEX, 8), "grafana {}"),
    _s("new_relic_user_key", "NRAK-" + r(UPPER + DIGITS, 27), "newrelic {}"),
    _s("dynatrace_token", "dt0c01." + r(UPPER + DIGITS, 24) + "." + r(UPPER + DIGITS, 64), "dt {}"),
    _s("planetscale_token", "pscale_tkn_" + r(URLSAFE, 43), "pscale {}"),
    _s("supabase_pat", "sbp_" + r(HEX, 40), "supabase {}"),
    # AI providers
    _s("openai_project_key", "sk-proj-" + r(URLSAFE, 48), "OPENAI_API_KEY {}"),
    _s("openai_legacy_key", "sk-" + r(ALNUM, 48), "{}"),
    _s("anthropic_api_key", "sk-ant-api03-" + r(URLSAFE, 93) + "AA", "ANTHROPIC {}"),
    _s("huggingface_token", "hf_" + r(ALNUM, 34), "HF {}"),
    _s("groq_api_key", "gsk_" + r(ALNUM, 52), "groq {}"),
    _s("replicate_token", "r8_" + r(ALNUM, 37), "replicate {}"),
    _s("xai_api_key", "xai-" + r(ALNUM, 80), "xai {}"),
    _s("perplexity_api_key", "pplx-" + r(ALNUM, 48), "pplx {}"),
    _s("langsmith_key", "lsv2_pt_" + r(HEX, 32) + "_" + r(HEX, 10), "langsmith {}"),
    # payments, messaging, SaaS
    _s("stripe_live_secret_key", "sk_live_" + r(ALNUM, 99), "stripe {}"),
    _s("stripe_restricted_key", "rk_live_" + r(ALNUM, 99), "{}"),
    _s("stripe_webhook_secret", "whsec_" + r(ALNUM, 32), "STRIPE_WEBHOOK_SECRET {}"),
    _s("square_access_token", "EAAA" + r(URLSAFE, 60), "square {}"),
    _s("square_oauth_secret", "sq0csp-" + r(URLSAFE, 43), "square {}"),
    _s("braintree_access_token", "access_token$production$" + r(LOWER + DIGITS, 16) + "$" + r(HEX, 32), "bt {}"),
    _s("shopify_access_token", "shpat_" + r(HEX, 32), "shopify {}"),
    _s("flutterwave_secret_key", "FLWSECK-" + r(HEX, 32) + "-X", "flw {}"),
    _s("meta_access_token", "EAAB" + r(ALNUM, 150), "graph {}"),
    _s("slack_bot_token", "xoxb-" + r(DIGITS, 12) + "-" + r(DIGITS, 13) + "-" + r(ALNUM, 24), "slack {}"),
    _s("slack_user_token", "xoxp-" + r(DIGITS, 12) + "-" + r(DIGITS, 12) + "-" + r(ALNUM, 32), "{}"),
    _s("slack_app_token", "xapp-1-A" + r(UPPER + DIGITS, 10) + "-" + r(DIGITS, 13) + "-" + r(HEX, 64), "{}"),
    _s(
        "slack_webhook_url",
        "T" + r(UPPER + DIGITS, 10) + "/B" + r(UPPER + DIGITS, 10) + "/" + r(ALNUM, 24),
        "https://hooks.slack.com/services/{}",
    ),
    _s("discord_webhook_url", r(URLSAFE, 68), "https://discord.com/api/webhooks/1234567890123456789/{}"),
    _s("telegram_bot_token", r(DIGITS, 10) + ":AA" + r(URLSAFE, 33), "https://api.telegram.org/bot{}/getMe"),
    _s("twilio_api_key_sid", "SK" + r(HEX, 32), "twilio key {}"),
    _s("twilio_auth_token", r(HEX, 32), "TWILIO_AUTH_TOKEN={}"),
    _s("sendgrid_api_key", "SG." + r(URLSAFE, 22) + "." + r(URLSAFE, 43), "sendgrid {}"),
    _s("mailgun_api_key", "key-" + r(HEX, 32), "mailgun {}"),
    _s("mailchimp_api_key", r(HEX, 32) + "-us21", "mailchimp {}"),
    _s("postman_api_key", "PMAK-" + r(HEX, 24) + "-" + r(HEX, 34), "postman {}"),
    _s("linear_api_key", "lin_api_" + r(ALNUM, 40), "linear {}"),
    _s("notion_token", "ntn_" + r(DIGITS, 11) + r(ALNUM, 35), "notion {}"),
    _s("airtable_pat", "pat" + r(ALNUM, 14) + "." + r(HEX, 64), "airtable {}"),
    _s("figma_pat", "figd_" + r(URLSAFE, 40), "figma {}"),
    _s("contentful_pat", "CFPAT-" + r(URLSAFE, 43), "contentful {}"),
    _s("cloudflare_origin_ca_key", "v1.0-" + r(HEX, 24) + "-" + r(HEX, 146), "cf {}"),
)
"""At least 60 formats (one sample each)."""


def placements(sample: Sample) -> Iterator[tuple[str, str, Any]]:
    """(placement, method, input): where tool calls carry a secret. ``method`` is ``arguments`` or ``text``."""
    ctx = sample.context
    yield "argument", "arguments", {"text": ctx}
    yield "nested", "arguments", {"config": {"env": {"VALUE": ctx}, "level": 2}, "path": "/srv/app"}
    yield "array", "arguments", {"items": ["first", ctx, 3, None]}
    yield "error_text", "text", f"Error: upstream call failed ({ctx}); retry later"
    yield "json_escaped", "arguments", {"body": json.dumps({"data": {"note": ctx}, "n": 1})}
    yield "url_encoded", "text", "GET /callback?state=xyz&data=" + quote(ctx, safe="") + " -> 400"
    yield "base64", "arguments", {"blob": base64.b64encode(ctx.encode()).decode(), "kind": "config"}


def leaks(sample: Sample, stored: str) -> list[str]:
    """The forms of the sample's secret still present in ``stored`` (should be none)."""
    forms = {
        "raw": sample.needle,
        "json": json.dumps(sample.needle)[1:-1],
        "url": quote(sample.needle, safe=""),
        "base64": base64.b64encode(sample.context.encode()).decode(),
    }
    return [name for name, form in forms.items() if form and form in stored]
