"""Config import and export: the whole proxy configuration as one JSON document.

``export_config`` turns the config rows into plain data in which objects refer
to each other by ``name``. ``read_document`` checks a JSON text against that
same shape (unknown keys, wrong types, missing names are refused before any
row is read); ``import_config`` then validates every object with the admin's
own forms and saves it, all or nothing, as one config revision.

Import merges, it never deletes: objects are matched by name and created or
updated, objects absent from the document are left alone. Fields absent from
an entry keep their stored value (the model default for a new object). The
lists inside an object — an upstream's targets, a host's names — are replaced
whole, as the admin's inline forms do.

Private keys leave the database only when the caller asks (``with_keys``); the
Fernet token (``key_token``) never does. The same goes for access-list users' password
hashes; a clear ``password`` in an imported document is hashed on the way in.

Access lists and rate limits have a fixed shape that scripts rely on (fields may be
added, never renamed): ``"access_lists": [{"name", "default", "rules": [{"action",
"source"}], "satisfy", "users": [{"username", "password" | "password_hash"}]}]`` and, per
host, ``"access_list": name`` and ``"rate_limit": {"requests_per_second", "burst",
"connections_per_client"}`` (absent or null: no limit).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from django import forms as django_forms
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import models, transaction

from proxyadmin import accesslists, crypto, forms, revisions
from proxyadmin import models as m

FORMAT = "proxyadmin-config"
VERSION = 1
ACTOR = "importconfig"

JsonTypes = tuple[type, ...]


class ConfigFileError(ValueError):
    """The document is not a proxyadmin config export; the message says where and why."""


# -- the shape of the document ------------------------------------------------------------


def config_fields(
    model: type[models.Model], exclude: Collection[str] = ()
) -> list[models.Field[Any, Any]]:
    """The fields an operator sets (the ones the admin edits), in model order."""
    return [
        f for f in model._meta.concrete_fields
        if f.editable and not f.primary_key and f.name not in exclude
    ]


def _json_types(field: models.Field[Any, Any]) -> JsonTypes:
    if field.is_relation:
        return (str, type(None))
    if isinstance(field, models.BooleanField):
        return (bool,)
    if isinstance(field, models.FloatField):
        return (int, float)
    if isinstance(field, models.IntegerField):
        return (int,)
    return (str,)


def _shape(model: type[models.Model], exclude: Collection[str] = ()) -> dict[str, JsonTypes]:
    return {f.name: _json_types(f) for f in config_fields(model, exclude)}


@dataclass(frozen=True)
class Kind:
    """One list of the document: its key, the word for one entry, and its keys' JSON types."""

    section: str
    label: str
    model: type[models.Model]
    extra: Mapping[str, JsonTypes]
    required: tuple[str, ...] = ("name",)
    exclude: tuple[str, ...] = ()  # model fields the document carries in another shape

    def shape(self) -> dict[str, JsonTypes]:
        return _shape(self.model, self.exclude) | dict(self.extra)


CERTIFICATES = Kind(
    "certificates", "certificate", m.Certificate,
    {"key_pem": (str,), "allow_incomplete": (bool,)}, ("name", "chain_pem"),
)
CLIENT_CAS = Kind("client_cas", "client CA", m.ClientCA, {}, ("name", "bundle_pem"))
HSTS_POLICIES = Kind("hsts_policies", "HSTS policy", m.HSTSPolicy, {})
UPSTREAMS = Kind("upstreams", "upstream", m.Upstream, {"targets": (list,)})
ACCESS_LISTS = Kind("access_lists", "access list", m.AccessList, {"rules": (list,), "users": (list,)})
# The host's rate-limit fields, as the document's "rate_limit" object names them.
RATE_LIMIT_FIELDS = {
    "requests_per_second": "rate_limit_rps", "burst": "rate_limit_burst",
    "connections_per_client": "rate_limit_connections",
}
# "acme" is the challenge ("http-01", "tls-alpn-01", "any") or null when off.
HOSTS = Kind("hosts", "host", m.Host, {
    "names": (list,), "acme": (str, type(None)), "rate_limit": (dict, type(None)),
}, exclude=tuple(RATE_LIMIT_FIELDS.values()))
# In the order of application: each kind refers only to kinds before it.
KINDS = (CERTIFICATES, CLIENT_CAS, HSTS_POLICIES, UPSTREAMS, ACCESS_LISTS, HOSTS)

TARGET_EXCLUDE = ("upstream",)
TOP_LEVEL: dict[str, JsonTypes] = {
    "format": (str,), "version": (int,), "revision": (int,), "settings": (dict,),
    **{kind.section: (list,) for kind in KINDS},
}


# -- export -------------------------------------------------------------------------------


def dump_object(obj: models.Model, exclude: Collection[str] = ()) -> dict[str, Any]:
    """The operator-set fields of ``obj``, references by name."""
    out: dict[str, Any] = {}
    for field in config_fields(type(obj), exclude):
        if not field.is_relation:
            out[field.name] = field.value_from_object(obj)
        elif getattr(obj, field.attname) is None:
            out[field.name] = None
        else:
            out[field.name] = getattr(obj, field.name).name
    return out


def dump_certificate(cert: m.Certificate, *, with_keys: bool) -> dict[str, Any]:
    out = dump_object(cert)
    # A local-CA chain is complete only where that CA is stored, which an export does not carry.
    out["allow_incomplete"] = not cert.chain_complete or cert.source == m.Certificate.Source.GENERATED
    if with_keys:
        try:
            out["key_pem"] = cert.private_key_pem().decode("ascii")
        except crypto.KeyConfigError as exc:
            raise crypto.KeyConfigError(f"Certificate '{cert.name}': {exc}") from None
    return out


def dump_upstream(upstream: m.Upstream) -> dict[str, Any]:
    targets = upstream.targets.all() if upstream.pk else []
    return dump_object(upstream) | {"targets": [dump_object(t, TARGET_EXCLUDE) for t in targets]}


def _dump_host_fields(host: m.Host) -> dict[str, Any]:
    limits = {key: getattr(host, field) for key, field in RATE_LIMIT_FIELDS.items()}
    return dump_object(host, HOSTS.exclude) | {
        "acme": host.acme or None,
        "rate_limit": limits if any(v is not None for v in limits.values()) else None,
    }


def dump_access_list(acl: m.AccessList, *, with_keys: bool) -> dict[str, Any]:
    """An access list in the document's shape; users' password hashes only ``with_keys``."""
    # Sorted here, not by the database: its collation must not make an import look like a change.
    users = sorted(acl.users.all(), key=lambda u: u.username) if acl.pk else []
    return dump_object(acl) | {
        "rules": [{"action": action, "source": source}
                  for action, source in accesslists.parse_rules(acl.rules)],
        "users": [{"username": u.username, **({"password_hash": u.password_hash} if with_keys else {})}
                  for u in users],
    }


def dump_host(host: m.Host) -> dict[str, Any]:
    return _dump_host_fields(host) | {"names": host.hostnames() if host.pk else []}


def _settings_row() -> m.ProxySettings | None:
    return m.ProxySettings.objects.filter(pk=1).select_related("default_certificate").first()


def export_config(*, with_keys: bool = False) -> dict[str, Any]:
    """The whole configuration as plain data; private keys in clear only ``with_keys``."""
    upstreams = m.Upstream.objects.select_related("tls_client_certificate").prefetch_related(
        "targets"
    )
    hosts = m.Host.objects.select_related(
        "certificate", "upstream", "hsts_policy", "client_ca", "access_list"
    ).prefetch_related("names")
    return {
        "format": FORMAT,
        "version": VERSION,
        "revision": m.ConfigRevision.current(),
        "settings": dump_object(_settings_row() or m.ProxySettings()),
        "certificates": [
            dump_certificate(c, with_keys=with_keys) for c in m.Certificate.objects.all()
        ],
        "client_cas": [dump_object(c) for c in m.ClientCA.objects.all()],
        "hsts_policies": [dump_object(p) for p in m.HSTSPolicy.objects.all()],
        "upstreams": [dump_upstream(u) for u in upstreams],
        "access_lists": [
            dump_access_list(a, with_keys=with_keys) for a in m.AccessList.objects.prefetch_related("users")
        ],
        "hosts": [dump_host(h) for h in hosts],
    }


def to_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# -- reading a document -------------------------------------------------------------------

_EXPECTED = {
    (str, type(None)): "a name or null",
    (bool,): "true or false",
    (int, float): "a number",
    (int,): "an integer",
    (str,): "a string",
    (list,): "a list",
    (dict,): "an object",
    (dict, type(None)): "an object or null",
    (int, float, type(None)): "a number or null",
    (int, type(None)): "an integer or null",
}


def _json_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _has_type(value: object, types: JsonTypes) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not the number 1
    return isinstance(value, types)


def _check_entry(
    where: str, entry: object, shape: Mapping[str, JsonTypes], required: Collection[str]
) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ConfigFileError(f"{where}: expected an object, got {_json_name(entry)}.")
    unknown = [key for key in entry if key not in shape]
    if unknown:
        raise ConfigFileError(
            f"{where}: unknown key {', '.join(repr(k) for k in unknown)} "
            f"(known keys: {', '.join(shape)})."
        )
    missing = [key for key in required if key not in entry]
    if missing:
        raise ConfigFileError(f"{where}: missing key {', '.join(repr(k) for k in missing)}.")
    for key, value in entry.items():
        if not _has_type(value, shape[key]):
            raise ConfigFileError(
                f"{where}: {key!r} must be {_EXPECTED[shape[key]]}, not {_json_name(value)}."
            )
    return entry


def _check_lists(where: str, entry: dict[str, Any]) -> None:
    """An upstream's targets and a host's names: the lists inside an entry."""
    target_shape = _shape(m.UpstreamTarget, TARGET_EXCLUDE)
    for index, target in enumerate(entry.get("targets", [])):
        _check_entry(f"{where}: targets[{index}]", target, target_shape, ("host", "port"))
    for index, name in enumerate(entry.get("names", [])):
        if not isinstance(name, str):
            raise ConfigFileError(
                f"{where}: names[{index}] must be a string, not {_json_name(name)}."
            )
    if len(entry.get("rules", [])) > accesslists.MAX_RULES:
        raise ConfigFileError(f"{where}: at most {accesslists.MAX_RULES} rules in an access list.")
    for index, rule in enumerate(entry.get("rules", [])):
        _check_entry(f"{where}: rules[{index}]", rule, RULE_SHAPE, ("action", "source"))
    if len(entry.get("users", [])) > accesslists.MAX_USERS:
        raise ConfigFileError(f"{where}: at most {accesslists.MAX_USERS} users in an access list.")
    for index, user in enumerate(entry.get("users", [])):
        _check_entry(f"{where}: users[{index}]", user, USER_SHAPE, ("username",))
    if entry.get("rate_limit") is not None:
        _check_entry(f"{where}: rate_limit", entry["rate_limit"], RATE_LIMIT_SHAPE, ())


RULE_SHAPE: dict[str, JsonTypes] = {"action": (str,), "source": (str,)}
USER_SHAPE: dict[str, JsonTypes] = {"username": (str,), "password": (str,), "password_hash": (str,)}
RATE_LIMIT_SHAPE: dict[str, JsonTypes] = {
    "requests_per_second": (int, float, type(None)), "burst": (int, type(None)),
    "connections_per_client": (int, type(None)),
}


def _check_section(kind: Kind, entries: list[Any]) -> None:
    seen: set[str] = set()
    for index, raw in enumerate(entries):
        name = raw.get("name") if isinstance(raw, dict) else None
        where = f"{kind.section}[{index}]"
        where += f" ({kind.label} '{name}')" if isinstance(name, str) else ""
        entry = _check_entry(where, raw, kind.shape(), kind.required)
        if entry["name"] in seen:
            raise ConfigFileError(f"{where}: the name is listed twice in {kind.section}.")
        seen.add(entry["name"])
        _check_lists(where, entry)


def _check_header(raw: dict[str, Any]) -> None:
    # Values are not echoed: a stray private key pasted here must not reach the terminal.
    if raw.get("format") != FORMAT:
        problem = "is missing" if "format" not in raw else f"is not {FORMAT!r}"
        raise ConfigFileError(f"'format' {problem}: this is not a proxyadmin config export.")
    version = raw.get("version")
    if "version" not in raw:
        raise ConfigFileError(f"'version' is missing (this proxyadmin reads version {VERSION}).")
    if type(version) is not int:
        raise ConfigFileError(f"'version' must be an integer, not {_json_name(version)}.")
    if version != VERSION:
        raise ConfigFileError(
            f"version {version} is not supported: this proxyadmin reads version {VERSION} only."
        )


def check_document(raw: object) -> dict[str, Any]:
    """Check ``raw`` (parsed JSON) against the export's shape; raise ``ConfigFileError``."""
    if not isinstance(raw, dict):
        raise ConfigFileError(f"expected a JSON object at the top, got {_json_name(raw)}.")
    _check_header(raw)
    document = _check_entry("the document", raw, TOP_LEVEL, ("format", "version"))
    if "settings" in document:
        _check_entry("settings", document["settings"], _shape(m.ProxySettings), ())
    for kind in KINDS:
        _check_section(kind, document.get(kind.section, []))
    return document


def read_document(text: str) -> dict[str, Any]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"not valid JSON: {exc}.") from None
    return check_document(raw)


# -- import -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the import did, or would do, with one object."""

    verb: str  # created, changed, unchanged or refused
    what: str  # "host 'web'"
    problems: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        return self.verb == "refused"

    def line(self) -> str:
        text = f"{self.verb} {self.what}"
        return f"{text}: {'; '.join(self.problems)}" if self.problems else text


def _existing(model: type[models.Model], name: str) -> Any:
    return model._default_manager.filter(name=name).first()


def _pk_by_name(field: models.Field[Any, Any], name: str) -> Any:
    related = cast(type[models.Model], field.related_model)
    return related._default_manager.filter(name=name).values_list("pk", flat=True).first()


def _form_data(
    model: type[models.Model], values: Mapping[str, Any], exclude: Collection[str] = ()
) -> tuple[dict[str, str], dict[str, str]]:
    """POST-like data for ``model``'s form, and the references that name nothing stored."""
    data: dict[str, str] = {}
    missing: dict[str, str] = {}
    for field in config_fields(model, exclude):
        value = values.get(field.name)
        if field.is_relation and value is not None:
            name, value = value, _pk_by_name(field, value)
            if value is None:
                label = cast(type[models.Model], field.related_model)._meta.verbose_name
                missing[field.name] = f"no {label} named '{name}'."
        if value is True:
            data[field.name] = "on"  # an unticked checkbox is simply absent
        elif value is not None and value is not False:
            data[field.name] = str(value)
    return data, missing


def _form_problems(
    form: django_forms.BaseForm, prefix: str = "", known: Mapping[str, str] | None = None
) -> list[str]:
    """The form's errors as "field: message"; fields already in ``known`` keep that message."""
    known = known or {}
    problems = [f"{prefix}{field}: {message}" for field, message in known.items()]
    for field, messages in form.errors.items():
        if field in known:
            continue
        label = prefix.rstrip(".: ") if field == NON_FIELD_ERRORS else f"{prefix}{field}"
        problems += [f"{label}: {message}" if label else str(message) for message in messages]
    return problems


def _saved(what: str, created: bool) -> Outcome:
    return Outcome("created" if created else "changed", what)


def _certificate_form(
    entry: Mapping[str, Any], existing: m.Certificate | None, inspections: forms.UploadInspections | None
) -> tuple[forms.CertificateForm, dict[str, Any]]:
    """The admin's form for a certificate entry, and the entry over the stored values."""
    base = dump_certificate(existing, with_keys=False) if existing else {"source": "uploaded"}
    values = {**base, **entry}
    form = forms.CertificateForm(
        {
            "name": entry["name"], "chain_pem": values["chain_pem"], "key_pem": values.get("key_pem", ""),
            **({"allow_incomplete": "on"} if values.get("allow_incomplete") else {}),
        },
        instance=existing,
        inspections=inspections,
    )
    return form, values


def inspect_certificates(document: Mapping[str, Any]) -> forms.UploadInspections:
    """Check every certificate of the document, before the import's transaction opens.

    Checking chains is the slow part of an import; done inside the transaction, it
    would hold the database's write lock (SQLite) the whole time. The forms validated
    inside it find their results here.
    """
    inspections = forms.UploadInspections()
    for entry in document.get(CERTIFICATES.section, []):
        existing = _existing(m.Certificate, entry["name"])
        _certificate_form(entry, existing, inspections)[0].is_valid()
    return inspections


def import_certificate(
    entry: Mapping[str, Any], inspections: forms.UploadInspections | None = None
) -> Outcome:
    name = entry["name"]
    what = f"certificate '{name}'"
    existing: m.Certificate | None = _existing(m.Certificate, name)
    if existing is None and not entry.get("key_pem") and "PRIVATE KEY" not in entry["chain_pem"]:
        return Outcome(
            "refused", what, (f"certificate '{name}' has no key_pem and none is stored under that name",)
        )
    before = dump_object(existing) if existing else None
    stored_key = _stored_key(existing)
    form, values = _certificate_form(entry, existing, inspections)
    problems = _form_problems(form)
    if values["source"] not in m.Certificate.Source.values:
        problems.append(
            f"source: '{values['source']}' is not one of {', '.join(m.Certificate.Source.values)}."
        )
    if problems or form.inspected is None:
        return Outcome("refused", what, tuple(problems))
    form.instance.source = values["source"]
    form.instance.chain_pem = form.inspected.chain_pem
    if before == dump_object(form.instance) and stored_key == form.inspected.key_pem:
        return Outcome("unchanged", what)
    form.save()
    return _saved(what, existing is None)


def _stored_key(cert: m.Certificate | None) -> bytes | None:
    if cert is None:
        return None
    try:
        return cert.private_key_pem()
    except crypto.KeyConfigError:
        return None  # the form reports it when it needs the stored key


def import_client_ca(entry: Mapping[str, Any]) -> Outcome:
    what = f"client CA '{entry['name']}'"
    existing: m.ClientCA | None = _existing(m.ClientCA, entry["name"])
    before = dump_object(existing) if existing else None
    data, missing = _form_data(m.ClientCA, {**(before or {}), **entry})
    form = forms.ClientCAForm(data, instance=existing)
    problems = _form_problems(form, known=missing)
    if problems:
        return Outcome("refused", what, tuple(problems))
    form.instance.set_bundle(form.certs)
    if before == dump_object(form.instance):
        return Outcome("unchanged", what)
    form.save()
    return _saved(what, existing is None)


def import_hsts_policy(entry: Mapping[str, Any]) -> Outcome:
    what = f"HSTS policy '{entry['name']}'"
    existing: m.HSTSPolicy | None = _existing(m.HSTSPolicy, entry["name"])
    before = dump_object(existing) if existing else None
    data, missing = _form_data(m.HSTSPolicy, {**(before or dump_object(m.HSTSPolicy())), **entry})
    form = forms.HSTSPolicyForm(data, instance=existing)
    problems = _form_problems(form, known=missing)
    if problems:
        return Outcome("refused", what, tuple(problems))
    if before == dump_object(form.instance):
        return Outcome("unchanged", what)
    form.save()
    return _saved(what, existing is None)


def _target_forms(entries: list[Mapping[str, Any]]) -> tuple[list[forms.UpstreamTargetForm], list[str]]:
    """One validated form per target; the list replaces the upstream's targets."""
    if not entries:
        return [], ["targets: an upstream needs at least one target."]
    defaults = dump_object(m.UpstreamTarget(), TARGET_EXCLUDE)
    target_forms, problems, seen = [], [], set()
    for index, entry in enumerate(entries):
        data, _ = _form_data(m.UpstreamTarget, {**defaults, **entry}, TARGET_EXCLUDE)
        form = forms.UpstreamTargetForm(data, instance=m.UpstreamTarget())
        problems += _form_problems(form, prefix=f"targets[{index}].")
        if form.is_valid():
            address = (form.instance.host, form.instance.port)
            if address in seen:
                problems.append(f"targets[{index}]: {address[0]}:{address[1]} is listed twice.")
            seen.add(address)
        target_forms.append(form)
    return target_forms, problems


def _target_key(target: Mapping[str, Any]) -> tuple[str, int]:
    return target["host"], target["port"]


def _replace_targets(upstream: m.Upstream, target_forms: list[forms.UpstreamTargetForm]) -> None:
    current = {(t.host, t.port): t for t in upstream.targets.all()}
    for form in target_forms:
        wanted = form.instance
        target = current.pop((wanted.host, wanted.port), None)
        if target is None:
            wanted.upstream = upstream
            wanted.save()
        elif dump_object(target, TARGET_EXCLUDE) != dump_object(wanted, TARGET_EXCLUDE):
            wanted.pk, wanted.upstream = target.pk, upstream
            wanted.save()
    for stale in current.values():
        stale.delete()


def import_upstream(entry: Mapping[str, Any]) -> Outcome:
    what = f"upstream '{entry['name']}'"
    existing: m.Upstream | None = _existing(m.Upstream, entry["name"])
    before = dump_upstream(existing) if existing else None
    values = {**(before or dump_upstream(m.Upstream())), **entry}
    data, missing = _form_data(m.Upstream, values)
    form = forms.UpstreamForm(data, instance=existing)
    target_forms, target_problems = _target_forms(values["targets"])
    problems = _form_problems(form, known=missing) + target_problems
    if problems:
        return Outcome("refused", what, tuple(problems))
    targets = [dump_object(f.instance, TARGET_EXCLUDE) for f in target_forms]
    after = dump_object(form.instance) | {"targets": targets}
    if before is not None and _same_upstream(before, after):
        return Outcome("unchanged", what)
    upstream = form.save()
    _replace_targets(upstream, target_forms)
    return _saved(what, existing is None)


def _same_upstream(before: dict[str, Any], after: dict[str, Any]) -> bool:
    # The order of targets is the order they were added in; it carries no meaning.
    return {**before, "targets": sorted(before["targets"], key=_target_key)} == {
        **after, "targets": sorted(after["targets"], key=_target_key)
    }


def _replace_names(host: m.Host, names: list[str]) -> None:
    host.names.exclude(name__in=names).delete()
    have = set(host.names.values_list("name", flat=True))
    for name in names:
        if name not in have:
            m.HostName.objects.create(host=host, name=name)


def import_host(entry: Mapping[str, Any]) -> Outcome:
    what = f"host '{entry['name']}'"
    existing: m.Host | None = _existing(m.Host, entry["name"])
    before = dump_host(existing) if existing else None
    values = {**(before or dump_host(m.Host())), **entry}
    limits = values.get("rate_limit") or {}
    data, missing = _form_data(m.Host, values | {
        field: limits.get(key) for key, field in RATE_LIMIT_FIELDS.items()})
    data["acme"] = values.get("acme") or ""  # null is off: sent as the empty choice, not left out
    form = forms.HostForm(data, instance=existing, names=values["names"])
    problems = _form_problems(form, known=missing)
    names, name_problems = forms.clean_host_names(
        values["names"], form.cleaned_data.get("certificate"), existing,
        acme=form.cleaned_data.get("acme") or "",
    )
    problems += [f"names: {problem}" for problem in name_problems]
    if problems:
        return Outcome("refused", what, tuple(problems))
    after = _dump_host_fields(form.instance) | {"names": names}
    if before is not None and _same_host(before, after):
        return Outcome("unchanged", what)
    host = form.save()
    _replace_names(host, names)
    return _saved(what, existing is None)


def _user_hashes(
    entries: list[Mapping[str, Any]], existing: m.AccessList | None
) -> tuple[list[tuple[str, str]], list[str]]:
    """(username, password hash) for each user entry, and the problems: a clear password is
    hashed (kept as stored when it is the stored one), an exported hash checked, and a user
    with neither keeps the stored hash."""
    stored = {u.username: u.password_hash for u in existing.users.all()} if existing else {}
    users: list[tuple[str, str]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"users[{index}]"
        try:
            username = accesslists.check_username(entry["username"])
            if username in seen:
                raise ValidationError(f"the user '{username}' is listed twice.")
            seen.add(username)
            if "password" in entry and "password_hash" in entry:
                raise ValidationError("give a password or a password_hash, not both.")
            if "password" in entry:
                password = accesslists.check_password(entry["password"])
                old = stored.get(username)
                encoded = old if old and accesslists.password_matches(password, old) else (
                    accesslists.hash_password(password))
            elif "password_hash" in entry:
                encoded = accesslists.check_hash(entry["password_hash"])
            elif username in stored:
                encoded = stored[username]
            else:
                raise ValidationError(f"the new user '{username}' needs a password.")
        except ValidationError as exc:
            problems += [f"{where}: {message}" for message in exc.messages]
            continue
        users.append((username, encoded))
    return users, problems


def import_access_list(entry: Mapping[str, Any]) -> Outcome:
    what = f"access list '{entry['name']}'"
    existing: m.AccessList | None = _existing(m.AccessList, entry["name"])
    before = dump_access_list(existing, with_keys=True) if existing else None
    values = {**(before or dump_access_list(m.AccessList(), with_keys=True)), **entry}
    rules = "".join(f"{r['action']} {r['source']}\n" for r in values["rules"])
    data, missing = _form_data(m.AccessList, {**values, "rules": rules})
    form = forms.AccessListForm(data, instance=existing)
    users, problems = _user_hashes(values["users"], existing)
    problems = _form_problems(form, known=missing) + problems
    if problems:
        return Outcome("refused", what, tuple(problems))
    after = dump_object(form.instance) | {
        "rules": [{"action": a, "source": s} for a, s in accesslists.parse_rules(form.instance.rules)],
        "users": [{"username": u, "password_hash": h} for u, h in sorted(users, key=lambda user: user[0])],
    }
    if before is not None and before == after:
        return Outcome("unchanged", what)
    acl = form.save()
    acl.users.exclude(username__in=[u for u, _ in users]).delete()
    for username, encoded in users:
        m.AccessUser.objects.update_or_create(
            access_list=acl, username=username, defaults={"password_hash": encoded})
    return _saved(what, existing is None)


def _same_host(before: dict[str, Any], after: dict[str, Any]) -> bool:
    # Compared as sets: the database's collation decides the order names come back in.
    return {**before, "names": sorted(before["names"])} == {**after, "names": sorted(after["names"])}


def import_settings(entry: Mapping[str, Any]) -> Outcome:
    what = "proxy settings"
    existing = _settings_row()
    instance = existing or m.ProxySettings(pk=1)
    before = dump_object(instance)
    data, missing = _form_data(m.ProxySettings, {**before, **entry})
    form = forms.ProxySettingsForm(data, instance=instance)
    problems = _form_problems(form, known=missing)
    if problems:
        return Outcome("refused", what, tuple(problems))
    if before == dump_object(form.instance):
        return Outcome("unchanged", what)
    form.save()
    return _saved(what, existing is None)


IMPORTERS = {
    CERTIFICATES.section: import_certificate,
    CLIENT_CAS.section: import_client_ca,
    HSTS_POLICIES.section: import_hsts_policy,
    UPSTREAMS.section: import_upstream,
    ACCESS_LISTS.section: import_access_list,
    HOSTS.section: import_host,
}


def apply_document(
    document: Mapping[str, Any], inspections: forms.UploadInspections | None = None
) -> list[Outcome]:
    """Validate and save every object, referenced kinds first; refusals do not stop the rest."""
    importers: dict[str, Callable[[Mapping[str, Any]], Outcome]] = {
        **IMPORTERS, CERTIFICATES.section: partial(import_certificate, inspections=inspections),
    }
    outcomes = [
        importers[kind.section](entry) for kind in KINDS for entry in document.get(kind.section, [])
    ]
    if "settings" in document:
        outcomes.append(import_settings(document["settings"]))
    return outcomes


def import_config(document: Mapping[str, Any], *, dry_run: bool = False) -> list[Outcome]:
    """Apply a checked document as one revision, or nothing at all on a refusal or ``dry_run``.

    Everything is really saved inside the transaction, so an entry can refer to
    one defined earlier in the same document even in a dry run; the rollback
    then undoes it, the revision made on leaving the batch included. Certificates
    are checked before it opens (``inspect_certificates``).
    """
    inspections = inspect_certificates(document)
    with transaction.atomic():
        with revisions.revision_batch(ACTOR):
            outcomes = apply_document(document, inspections)
        if dry_run or any(outcome.refused for outcome in outcomes):
            transaction.set_rollback(True)
    return outcomes
