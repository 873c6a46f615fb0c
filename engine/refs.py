"""What a model or adapter name means: an engine alias, a local path, or a hub id.

Training, ``encode``, ``engine.evaluate`` and the export each take names of models and adapters, and they must read
one name the same way. The rule, in order:

1. ``alias``: a name in :data:`engine.assets.ALIASES` (``smollm2-135m``), fetched into the engine's cache;
2. ``local``: anything that exists on disk after ``~`` expansion, a file (``.gguf``) or a folder;
3. ``hub``: a hub model id, ``org/name``, each part made of letters, digits, ``-``, ``_`` and ``.``, not starting
   or ending with ``-`` or ``.``, with no ``--`` or ``..``, at most 96 characters, and whose ``org`` is not a local
   folder (``outputs/run1`` beside an ``outputs/`` folder is a missing run, not a model of user "outputs");
4. ``missing``: everything else, a local path that does not exist (``./x``, ``/x``, ``~/x``, three or more parts,
   a one-part name such as ``run1``).

One-part hub ids (``gpt2``) are the hub's legacy names, now redirected to ``org/name`` ones; every family this engine
supports has an ``org``. Treating a one-part name as a path makes a mistyped run folder an immediate "not found"
rather than a failed download.
"""
import json
import os
import re

from . import assets

_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_PART}/{_PART}")
# huggingface_hub's cache keeps a model's files under models--<org>--<name>/snapshots/<revision>
_HUB_CACHE = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")


def is_hub_id(name):
    """Whether ``name`` reads as ``org/name`` of the hub's grammar (the rule's step 3, without the disk)."""
    return (isinstance(name, str) and len(name) <= 96 and _HUB_ID.fullmatch(name) is not None
            and "--" not in name and ".." not in name)


def kind(name):
    """``alias``, ``local``, ``hub`` or ``missing`` (the module's rule)."""
    if assets.is_alias(name):
        return "alias"
    if os.path.lexists(os.path.expanduser(name)):
        return "local"
    if is_hub_id(name) and not _org_is_a_folder(name):
        return "hub"
    return "missing"


def _org_is_a_folder(name):
    return os.path.isdir(name.split("/")[0])


def not_found(name, what="model"):
    """The one line every command says for a ``missing`` name, with the reason it is not read as a hub id."""
    if is_hub_id(name) and _org_is_a_folder(name):
        why = (f"read as a path because {name.split('/')[0]}/ is a local folder; a hub id org/name needs no such "
               f"folder here")
    else:
        why = "neither a local path nor a hub id org/name"
    return f"{what} not found: {name} ({why})"


def is_local(name):
    """Whether ``name`` names a local path, present or not (``local`` or ``missing``)."""
    return kind(name) in ("local", "missing")


def local_path(name):
    """The absolute path of a local name (a run recorded with a relative path must still load from elsewhere)."""
    return os.path.abspath(os.path.expanduser(name))


def snapshot_id(path):
    """``org/name`` when ``path`` is a huggingface_hub cache snapshot (``.../models--org--name/snapshots/<rev>``),
    else None."""
    m = _HUB_CACHE.search(local_path(path))
    return f"{m['org']}/{m['name']}" if m and is_hub_id(f"{m['org']}/{m['name']}") else None


def hub_id_of(name):
    """The hub id a model was made from, or None.

    An alias gives the hub model its weights came from; a hub id is itself; a local folder gives what it says it
    came from: a hub cache snapshot (``models--org--name/snapshots/<rev>``) its ``org/name``, else its
    ``config.json`` ``_name_or_path`` when that is a hub id (llm2vec reads the same field), else the alias whose
    cached copy it is. A missing path has none.
    """
    if not name:
        return None
    k = kind(name)
    if k == "alias":
        return assets.ALIASES[name].get("hub_id")
    if k == "hub":
        return name
    if k == "missing":
        return None
    path = local_path(name)
    snap = snapshot_id(path)
    if snap:
        return snap
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                given = json.load(f).get("_name_or_path")
        except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
            raise ValueError(f"{cfg} does not read as a model config.json ({type(e).__name__}: {e})") from None
        if given and kind(given) == "hub":
            return given
    alias = assets.alias_of(path)
    return hub_id_of(alias) if alias else None
