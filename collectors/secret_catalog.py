"""The catalog of secret detectors used by :mod:`collectors.redact` (pure data, no I/O).

Each detector is written from the provider's documented (or published) token format: a fixed
prefix, alphabet and length where the provider has one, or a credential-like name followed by
an assignment where it has not. None is copied from another project's rule files; the test
``tests/unit/collectors/test_redaction_corpus.py`` checks the catalog against Yelp's
``detect-secrets`` plugins over the corpus (everything they find, the catalog finds too).

A detector has:

* ``keywords``: lower-case literals, one of which every match contains. The engine finds all
  keyword occurrences of a text in one Aho-Corasick pass and runs only the detectors whose
  keywords occur, *at* the occurrence (``pattern.match``), so a text without any keyword costs
  one automaton pass and nothing else;
* ``pattern``: a regular expression that matches starting at the keyword (``back == 0``), or,
  for formats whose distinctive literal sits inside the token (``back > 0``), that is searched
  in a window from ``back`` characters before the keyword to ``span`` characters after it.
  Every quantifier is bounded or runs over a class that cannot loop back onto itself, so the
  work per keyword occurrence is bounded (no catastrophic backtracking);
* a named group starting with ``secret`` (optional): only that group is replaced, otherwise
  the whole match;
* ``boundary``: the match must not follow a letter or digit (tokens embedded in longer words
  are not tokens).

:data:`BARE_DETECTORS` have no keyword (a bare 40-character AWS secret access key): they run
only when the text contains a run of at least 40 token characters, which a byte translation
finds at C speed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BARE_DETECTORS", "CATALOG", "CatalogEntry"]


@dataclass(frozen=True)
class CatalogEntry:
    """One detector of the catalog (see the module docstring)."""

    name: str
    keywords: tuple[str, ...]
    pattern: str
    source: str  # the provider and the format, as documented
    back: int = 0
    span: int = 0
    boundary: bool = True
    min_entropy: float = 0.0  # Shannon entropy (bits per character) the match must reach


_ASSIGN = r"\\?[\"']?[ \t]{0,8}[:=][ \t]{0,8}"  # `=`, `: `, `": "` or `\": \"` after a name
_VALUE = (
    r"(?:\\?\"(?P<secret_dq>[^\"\\\r\n]{{{n},4096}})|'(?P<secret_sq>[^'\r\n]{{{n},4096}})'"
    r"|(?P<secret>[^\s\"'\\&,;<>()\[\]{{}}]{{{n},4096}}))"
)
_B64 = "A-Za-z0-9+/"
_NOT_CODE = (  # `password=None`, `token = self._token`, `secret = os.environ[...]`: code, not a value
    r"(?!(?:None|null|nil|undefined|true|false|True|False)(?![A-Za-z0-9_.])"
    r"|(?:self|this|cls)\.|os\.environ|os\.getenv|process\.env|getpass\()"
)


def _e(name: str, keywords: str, pattern: str, source: str, **kw: object) -> CatalogEntry:
    return CatalogEntry(name, tuple(keywords.split()), pattern, source, **kw)  # type: ignore[arg-type]


CATALOG: tuple[CatalogEntry, ...] = (
    # -- key material and generic structures -------------------------------------------------------
    _e(
        "private_key",
        "-----begin",
        r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|\Z)",
        "PEM / OpenSSH / PGP private key blocks (RFC 7468, RFC 4880), also cut ones",
        boundary=False,
    ),
    _e(
        "putty_private_key",
        "private-lines:",
        r"Private-Lines:[ \t]{0,4}[0-9]{1,3}\s{1,4}(?P<secret>[A-Za-z0-9+/=\s]{16,8192})",
        "PuTTY .ppk private key (PuTTY user manual, appendix C)",
        boundary=False,
    ),
    _e(
        "age_secret_key",
        "age-secret-key-1",
        r"AGE-SECRET-KEY-1[QPZRY9X8GF2TVDW0S3JN54KHCE6MUA7L]{58}",
        "age X25519 identity (age-encryption.org/v1, Bech32)",
    ),
    _e(
        "jwt",
        "eyj",
        r"eyJ[A-Za-z0-9_-]{5,8192}\.[A-Za-z0-9_-]{5,16384}(?:\.[A-Za-z0-9_-]{0,8192}){0,3}",
        "JSON Web Token / JWE (RFC 7519, RFC 7516), base64url JOSE header",
    ),
    _e(
        "url_credentials",
        ":/",
        r"(?<=[A-Za-z0-9]):/{1,3}[^/\s:@]{0,256}:(?P<secret>[^/\s@]{1,256})@",
        "userinfo password in a URL or DSN (RFC 3986 3.2.1), also `scheme:/user:pw@host`",
        boundary=False,
    ),
    _e(
        "authorization_header",
        "authorization",
        r"(?i:authorization)\\?[\"']?[ \t]{0,8}[:=][ \t]{0,8}\\?[\"']?"
        r"(?![Bb][Ee][Aa][Rr][Ee][Rr][ \t]|[Bb][Aa][Ss][Ii][Cc][ \t]|SSWS[ \t])"
        r"(?:(?i:token|bot|apikey|digest|negotiate)[ \t]{1,8})?"
        r"(?P<secret>(?=[A-Za-z0-9._~+/=:-]{0,64}[0-9])[A-Za-z0-9._~+/=:-]{8,8192}|[A-Za-z0-9._~+/=:-]{16,8192})",
        "HTTP Authorization header value (RFC 9110 11.6.2), any scheme",
        boundary=False,
    ),
    _e(
        "bearer_token",
        "bearer basic ssws",
        r"(?i:bearer|basic|ssws)[ \t]{1,8}"
        r"(?P<secret>[A-Za-z0-9._~+/-]{20,8192}={0,2}|(?=[A-Za-z0-9._~+/-]{0,64}[0-9])[A-Za-z0-9._~+/-]{8,8192}={0,2})",
        "credentials after an HTTP auth scheme (RFC 6750 Bearer, RFC 7617 Basic, Okta SSWS)",
    ),
    # -- cloud providers -------------------------------------------------------------------------------
    _e(
        "aws_access_key",
        "akia asia abia acca a3t agpa aida aipa anpa anva aroa apka asca",
        r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[A-Z0-9]{16}(?![A-Za-z0-9])",
        "AWS access key id (IAM user guide: unique identifier prefixes)",
    ),
    _e(
        "aws_secret_key",
        "aws",
        r"(?i:aws)[A-Za-z0-9_. -]{0,20}?(?i:secret|sk)[A-Za-z0-9_. -]{0,20}?" + _ASSIGN + r"\\?[\"']?"
        r"(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])",
        "AWS secret access key (40 characters) after an aws...secret name",
        boundary=False,
    ),
    _e(
        "aws_presigned_signature",
        "x-amz-signature",
        r"(?i:x-amz-signature)=(?P<secret>[0-9a-f]{64})",
        "SigV4 presigned URL signature (AWS S3 API reference, query string auth)",
        boundary=False,
    ),
    _e(
        "azure_storage_account_key",
        "accountkey",
        r"(?i:accountkey)[ \t]{0,4}=[ \t]{0,4}(?P<secret>[" + _B64 + r"]{20,120}={0,2})",
        "Azure Storage connection string AccountKey= (Azure Storage docs)",
        boundary=False,
    ),
    _e(
        "azure_shared_access_key",
        "sharedaccesskey",
        r"(?i:sharedaccesskey)[ \t]{0,4}=[ \t]{0,4}(?P<secret>[" + _B64 + r"]{20,120}={0,2})",
        "Azure Service Bus / Event Hubs / IoT Hub connection string SharedAccessKey=",
        boundary=False,
    ),
    _e(
        "azure_sas_signature",
        "sig=",
        r"sig=(?P<secret>[A-Za-z0-9%+/]{16,256}(?:=|%3[Dd]){0,2})",
        "Azure shared access signature `sig=` (Azure Storage: create a service SAS)",
    ),
    _e(
        "azure_identifiable_key",
        "+ast +asb +aeh acdb azfu apim +acr azse",
        r"(?<![A-Za-z0-9+/])[" + _B64 + r"]{30,80}(?:\+ASt|\+ASb|\+AEh|ACDb|AzFu|APIM|\+ACR|AzSe)"
        r"[" + _B64 + r"]{4,10}={0,2}(?![A-Za-z0-9+/=])",
        "Azure identifiable keys with a service signature (Storage +ASt, Service Bus +ASb, ...)",
        back=84,
        span=24,
        boundary=False,
    ),
    _e(
        "azure_devops_pat",
        "azdo",
        r"(?<![A-Za-z0-9])[A-Za-z0-9]{76}AZDO[A-Za-z0-9]{4}(?![A-Za-z0-9])",
        "Azure DevOps personal access token, 84 characters with the AZDO signature",
        back=76,
        span=10,
        boundary=False,
    ),
    _e(
        "azure_ad_client_secret",
        "q~",
        r"(?<![A-Za-z0-9_~.-])[A-Za-z0-9_~.-]{3}[0-9]Q~[A-Za-z0-9_~.-]{31,34}(?![A-Za-z0-9_~.-])",
        "Microsoft Entra ID application client secret (`xxxNQ~` + 31-34 characters)",
        back=5,
        span=40,
        boundary=False,
    ),
    _e("gcp_api_key", "aiza", r"AIza[0-9A-Za-z_-]{35}", "Google API key (Google Cloud: API keys)"),
    _e(
        "gcp_oauth_client_secret",
        "gocspx-",
        r"GOCSPX-[A-Za-z0-9_-]{28}",
        "Google OAuth client secret",
    ),
    _e(
        "google_oauth_token",
        "ya29. 1//0",
        r"ya29\.[0-9A-Za-z_-]{20,2048}|1//0[0-9A-Za-z_-]{40,512}",
        "Google OAuth 2.0 access (ya29.) and refresh (1//0) tokens",
    ),
    _e(
        "digitalocean_token",
        "dop_v1_ doo_v1_ dor_v1_",
        r"do[por]_v1_[a-f0-9]{64}",
        "DigitalOcean personal, OAuth and refresh tokens",
    ),
    _e("heroku_api_key", "hrku-", r"HRKU-[A-Za-z0-9_-]{40,80}", "Heroku API key (HRKU- prefix)"),
    _e("alibaba_access_key", "ltai", r"LTAI[A-Za-z0-9]{12,20}(?![A-Za-z0-9])", "Alibaba Cloud AccessKey id"),
    # -- source hosting, registries, CI -------------------------------------------------------------------
    _e(
        "github_token",
        "ghp_ gho_ ghu_ ghs_ ghr_ github_pat_",
        r"gh[pousr]_[A-Za-z0-9]{20,255}|github_pat_[A-Za-z0-9_]{20,255}",
        "GitHub tokens (GitHub docs: about authentication, token prefixes)",
    ),
    _e(
        "gitlab_token",
        "glpat- gldt- glrt- glptt- glft- glimt- glcbt- glsoat- gloas- glagent- glffct- glswt-",
        r"gl(?:pat|dt|rt|ptt|ft|imt|cbt|soat|oas|agent|ffct|swt)-[A-Za-z0-9_.-]{20,255}",
        "GitLab tokens (GitLab docs: token prefixes)",
    ),
    _e(
        "atlassian_token",
        "atatt3 atbb atctt3",
        r"AT(?:ATT|CTT)3[A-Za-z0-9_=-]{60,300}|ATBB[A-Za-z0-9]{28,64}",
        "Atlassian API tokens (ATATT3) and Bitbucket app passwords (ATBB)",
    ),
    _e("npm_token", "npm_", r"npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])", "npm access token (npm docs)"),
    _e(
        "pypi_token",
        "pypi-",
        r"pypi-AgE(?:IcHlwaS5vcmc|NdGVzdC5weXBpLm9yZw)[A-Za-z0-9_-]{50,4096}",
        "PyPI / TestPyPI API token (macaroon, pypi.org/help)",
    ),
    _e("rubygems_token", "rubygems_", r"rubygems_[a-f0-9]{48}", "RubyGems API key"),
    _e("nuget_api_key", "oy2", r"oy2[a-z0-9]{43}(?![A-Za-z0-9])", "NuGet.org API key"),
    _e(
        "docker_hub_pat",
        "dckr_pat_ dckr_oat_",
        r"dckr_(?:pat|oat)_[A-Za-z0-9_-]{27,64}",
        "Docker Hub personal / organization access token",
    ),
    _e(
        "artifactory_token",
        "akc cmvmdgtu",
        r"AKC[a-zA-Z0-9]{10,128}|cmVmdGtuOjAxOj[A-Za-z0-9]{40,128}",
        "JFrog Artifactory API key (AKC) and reference token",
    ),
    _e(
        "terraform_cloud_token",
        ".atlasv1.",
        r"(?<![A-Za-z0-9])[A-Za-z0-9]{14}\.atlasv1\.[A-Za-z0-9_=-]{60,100}",
        "HCP Terraform / Terraform Cloud API token",
        back=14,
        span=110,
        boundary=False,
    ),
    _e("vault_token", "hvs. hvb. hvr.", r"hv[sbr]\.[A-Za-z0-9_-]{24,512}", "HashiCorp Vault tokens (1.10+ prefixes)"),
    _e("pulumi_token", "pul-", r"pul-[a-f0-9]{40}", "Pulumi access token"),
    _e(
        "doppler_token",
        "dp.pt. dp.st. dp.sa. dp.ct. dp.scim. dp.audit.",
        r"dp\.(?:pt|st|sa|ct|scim|audit)\.[A-Za-z0-9]{40,44}",
        "Doppler tokens",
    ),
    _e("databricks_token", "dapi", r"dapi[a-f0-9]{32}(?:-[0-9])?(?![A-Za-z0-9])", "Databricks personal access token"),
    _e(
        "sentry_token",
        "sntrys_ sntryu_",
        r"sntrys_[A-Za-z0-9+/=_]{40,400}|sntryu_[a-f0-9]{64}",
        "Sentry organization / user auth tokens",
    ),
    _e(
        "grafana_token",
        "glsa_ glc_",
        r"glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}|glc_[A-Za-z0-9+/]{32,400}={0,2}",
        "Grafana service account (glsa_) and Grafana Cloud (glc_) tokens",
    ),
    _e(
        "new_relic_key",
        "nrak- nrii- nraa- nrjs-",
        r"NR(?:AK|II|AA)-[A-Z0-9]{27}|NRJS-[a-f0-9]{19}",
        "New Relic user, ingest and browser keys",
    ),
    _e("dynatrace_token", "dt0c01.", r"dt0c01\.[A-Z0-9]{24}\.[A-Z0-9]{64}", "Dynatrace API token"),
    _e(
        "planetscale_token",
        "pscale_tkn_ pscale_pw_ pscale_oauth_",
        r"pscale_(?:tkn|pw|oauth)_[A-Za-z0-9_.-]{32,64}",
        "PlanetScale service token / password",
    ),
    _e("supabase_token", "sbp_", r"sbp_[a-f0-9]{40}", "Supabase personal access token"),
    # -- AI providers ----------------------------------------------------------------------------------------
    _e(
        "anthropic_api_key",
        "sk-ant-",
        r"sk-ant-(?:api|admin|sid)[0-9]{2}-[A-Za-z0-9_-]{32,300}",
        "Anthropic API / admin keys",
    ),
    _e(
        "openai_api_key",
        "sk-",
        r"sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_-]{20,300}",
        "OpenAI API keys (sk-, sk-proj-, sk-svcacct-)",
    ),
    _e(
        "huggingface_token",
        "hf_ api_org_",
        r"hf_[A-Za-z0-9]{30,64}(?![A-Za-z0-9])|api_org_[A-Za-z0-9]{30,40}",
        "Hugging Face user access / org token",
    ),
    _e("groq_api_key", "gsk_", r"gsk_[A-Za-z0-9]{48,56}", "Groq API key"),
    _e("replicate_token", "r8_", r"r8_[A-Za-z0-9]{37}(?![A-Za-z0-9])", "Replicate API token"),
    _e("xai_api_key", "xai-", r"xai-[A-Za-z0-9]{70,90}", "xAI API key"),
    _e("perplexity_api_key", "pplx-", r"pplx-[A-Za-z0-9]{40,56}", "Perplexity API key"),
    _e("langsmith_key", "lsv2_", r"lsv2_(?:pt|sk)_[a-f0-9]{32}_[a-f0-9]{10}", "LangSmith API key"),
    # -- payments, messaging, SaaS --------------------------------------------------------------------------
    _e(
        "stripe_key",
        "sk_live_ sk_test_ rk_live_ rk_test_",
        r"[sr]k_(?:live|test)_[A-Za-z0-9]{16,255}",
        "Stripe secret and restricted keys",
    ),
    _e("stripe_webhook_secret", "whsec_", r"whsec_[A-Za-z0-9+/=]{24,128}", "Stripe webhook signing secret"),
    _e(
        "square_token",
        "sq0atp- sq0csp- eaaa",
        r"sq0atp-[0-9A-Za-z_-]{22,60}|sq0csp-[0-9A-Za-z_-]{43,60}|EAAA[A-Za-z0-9_-]{60,100}",
        "Square access tokens and OAuth secrets",
    ),
    _e(
        "paypal_braintree_token",
        "access_token$",
        r"access_token\$(?:production|sandbox)\$[0-9a-z]{16}\$[0-9a-f]{32}",
        "PayPal Braintree access token",
    ),
    _e(
        "shopify_token",
        "shpat_ shpca_ shppa_ shpss_",
        r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}",
        "Shopify access tokens and shared secrets",
    ),
    _e("flutterwave_key", "flwseck-", r"FLWSECK(?:_TEST)?-[a-f0-9]{32}-X", "Flutterwave secret key"),
    _e("easypost_key", "ezak eztk", r"EZ[AT]K[A-Za-z0-9]{54}", "EasyPost API keys"),
    _e("shippo_token", "shippo_", r"shippo_(?:live|test)_[a-f0-9]{40}", "Shippo API token"),
    _e("duffel_token", "duffel_", r"duffel_(?:test|live)_[A-Za-z0-9_=-]{43}", "Duffel API token"),
    _e("meta_access_token", "eaa", r"EAA[A-Za-z0-9]{90,512}", "Meta (Facebook) Graph API access token"),
    _e("slack_token", "xox", r"xox[abposre]-[A-Za-z0-9-]{10,255}", "Slack bot / user / app tokens"),
    _e("slack_app_token", "xapp-", r"xapp-[0-9]-[A-Z0-9]{9,12}-[0-9]{10,14}-[a-f0-9]{32,64}", "Slack app-level token"),
    _e(
        "slack_webhook",
        "hooks.slack.com/",
        r"hooks\.slack\.com/(?:services|workflows|triggers)/(?P<secret>[A-Za-z0-9+/_-]{20,200})",
        "Slack incoming webhook URL",
        boundary=False,
    ),
    _e(
        "discord_webhook",
        "discord.com/api/webhooks/ discordapp.com/api/webhooks/",
        r"discord(?:app)?\.com/api/webhooks/[0-9]{15,22}/(?P<secret>[A-Za-z0-9_-]{60,100})",
        "Discord webhook URL",
        boundary=False,
    ),
    _e(
        "telegram_bot_token",
        ":aa",
        r"(?<![0-9])[0-9]{8,10}:AA[0-9A-Za-z_-]{33}(?![A-Za-z0-9_-])",
        "Telegram Bot API token",
        back=11,
        span=40,
        boundary=False,
    ),
    _e("twilio_api_key", "sk", r"SK[0-9a-fA-F]{32}(?![A-Za-z0-9])", "Twilio API key SID (SK + 32 hex)"),
    _e(
        "twilio_auth_token",
        "twilio",
        r"(?i:twilio)[A-Za-z0-9_. -]{0,24}?(?i:auth|token|secret)[A-Za-z0-9_. -]{0,24}?"
        + _ASSIGN
        + r"\\?[\"']?(?P<secret>[0-9a-f]{32})(?![0-9a-f])",
        "Twilio auth token (32 hex) after a twilio...token name",
        boundary=False,
    ),
    _e("sendgrid_api_key", "sg.", r"SG\.[A-Za-z0-9_-]{16,32}\.[A-Za-z0-9_-]{40,50}", "SendGrid API key"),
    _e("mailgun_api_key", "key-", r"key-[0-9a-f]{32}(?![A-Za-z0-9])", "Mailgun private API key"),
    _e(
        "mailchimp_api_key",
        "-us",
        r"(?<![A-Za-z0-9])[0-9a-f]{32}-us[0-9]{1,2}(?![A-Za-z0-9])",
        "Mailchimp API key (32 hex + data centre)",
        back=32,
        span=6,
        boundary=False,
    ),
    _e("postman_api_key", "pmak-", r"PMAK-[a-f0-9]{24}-[a-f0-9]{34}", "Postman API key"),
    _e("linear_api_key", "lin_api_", r"lin_api_[A-Za-z0-9]{40}", "Linear API key"),
    _e(
        "notion_token",
        "ntn_ secret_",
        r"ntn_[0-9]{11}[A-Za-z0-9]{35}|secret_[A-Za-z0-9]{43}(?![A-Za-z0-9])",
        "Notion integration token",
    ),
    _e("airtable_pat", "pat", r"pat[A-Za-z0-9]{14}\.[a-f0-9]{64}", "Airtable personal access token"),
    _e("figma_token", "figd_", r"figd_[A-Za-z0-9_-]{40}", "Figma personal access token"),
    _e("contentful_token", "cfpat-", r"CFPAT-[A-Za-z0-9_-]{43}", "Contentful personal access token"),
    _e("typeform_token", "tfp_", r"tfp_[A-Za-z0-9_.=-]{40,70}", "Typeform personal token"),
    _e("prefect_api_key", "pnu_", r"pnu_[A-Za-z0-9]{36}", "Prefect Cloud API key"),
    _e("cloudflare_origin_ca_key", "v1.0-", r"v1\.0-[a-f0-9]{24}-[a-f0-9]{146}", "Cloudflare Origin CA key"),
    # -- names followed by a value (the keyword-with-assignment approach) -----------------------------------
    _e(
        "password_assignment",
        "password passwd passphrase pwd",
        r"(?:(?i:password|passwd|passphrase)|(?i:pwd)(?!"
        + _ASSIGN
        + r"\\?[\"']?[/~]))"
        + _ASSIGN
        + _NOT_CODE
        + _VALUE.format(n=1),
        'a value assigned to a password name (`DB_PASSWORD=`, `"password": `, `Pwd=`; not `PWD=/a/path`)',
        boundary=False,
    ),
    _e(
        "credential_assignment",
        "api_key api-key apikey access_key access-key accesskey secret_key secret-key secretkey "
        "private_key private-key privatekey secret token credential session_key signing_key "
        "encryption_key master_key",
        r"(?i:api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key(?:[_-]?id)?|secret|token"
        r"|credentials?|session[_-]key|signing[_-]key|encryption[_-]key|master[_-]key)"
        + _ASSIGN
        + _NOT_CODE
        + _VALUE.format(n=8),
        "a value assigned to a credential name (`api_key=`, `client_secret: `, `X-Api-Key: `)",
        boundary=False,
    ),
)
"""The keyword detectors, in priority order (at one position the first that matches wins)."""

BARE_DETECTORS: tuple[CatalogEntry, ...] = (
    _e(
        "aws_secret_key",
        "",
        r"(?<![A-Za-z0-9/+=])(?=(?:[a-z0-9/+]{0,38}[A-Z]){2})(?=(?:[A-Z0-9/+]{0,38}[a-z]){2})"
        r"(?=[A-Za-z/+]{0,39}[0-9])(?!/)[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])",
        "a bare AWS secret access key: exactly 40 base64 characters, mixed case, a digit, random-looking",
        min_entropy=4.3,  # 40 random base64 characters: below 4.34 in 0.1 % of keys; paths and names: 4.2-4.4
    ),
)
"""Detectors without a keyword: they run when the text has a run of 40+ token characters."""
