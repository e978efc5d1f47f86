"""The JSON API: everything the pages show, plus the viewer's slices as raw arrays."""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, g, jsonify, request

from inference.web.audit import AuditAction
from inference.web.data import DEMO_BANNER, VIEWER_ROLES
from inference.web.images import VolumeCache, best_slice, mask_slice_bytes

blueprint = Blueprint("api", __name__, url_prefix="/api")
_volumes = VolumeCache()


def _context():
    return current_app.extensions["fedlesion"]


@blueprint.get("/studies")
def studies():
    data = _context().data
    return jsonify(demo_mode=data.demo_mode(), studies=data.studies())


@blueprint.get("/studies/<uid>")
def study(uid: str):
    context = _context()
    return jsonify(demo_mode=context.data.demo_mode(), study=context.view_study(uid, g.user))


@blueprint.post("/studies/<uid>/reprocess")
def reprocess(uid: str):
    return jsonify(study_uid=uid, jobs=_context().reprocess(uid, g.user)), 202


@blueprint.get("/studies/<uid>/volumes")
def volumes(uid: str):
    """The viewer's volumes with shape and default window; opening them is audited as a view of the images."""
    context = _context()
    if context.data.study(uid) is None:
        abort(404)
    paths = context.data.viewer_volumes(uid)
    context.audit.record(g.user, AuditAction.VIEW_IMAGES, uid)
    described = {}
    for role, path in paths.items():
        volume = _volumes.load(path)
        mask_path = context.data.overlay_mask(uid, role)
        best = best_slice(_volumes.load(mask_path), volume) if mask_path else volume.slices // 2
        described[role] = {**volume.describe(), "overlay": mask_path is not None, "best_slice": best}
    return jsonify(study_uid=uid, volumes=described)


def _volume(uid: str, role: str):
    if role not in VIEWER_ROLES:
        abort(404)
    path = _context().data.viewer_volumes(uid).get(role)
    if path is None:
        abort(404)
    return _volumes.load(path)


def _raw(payload: bytes, rows: int, columns: int, dtype: str) -> Response:
    response = Response(payload, mimetype="application/octet-stream")
    response.headers.update({"X-Rows": str(rows), "X-Columns": str(columns), "X-Dtype": dtype})
    return response


@blueprint.get("/studies/<uid>/volumes/<role>/<int:index>")
def volume_slice(uid: str, role: str, index: int):
    """Slice `index` of a source volume as float32 (rows × columns, little-endian)."""
    volume = _volume(uid, role)
    if not 0 <= index < volume.slices:
        abort(404)
    return _raw(volume.slice_bytes(index), volume.data.shape[1], volume.data.shape[0], "float32")


@blueprint.get("/studies/<uid>/overlay/<role>/<int:index>")
def overlay_slice(uid: str, role: str, index: int):
    """The lesion mask on slice `index` of a source volume as uint8 0/1 (same layout as the slice)."""
    volume = _volume(uid, role)
    mask_path = _context().data.overlay_mask(uid, role)
    if mask_path is None or not 0 <= index < volume.slices:
        abort(404)
    mask = _volumes.load(mask_path)
    return _raw(mask_slice_bytes(mask, volume, index), volume.data.shape[1], volume.data.shape[0], "uint8")


@blueprint.get("/models")
def models():
    status = _context().data.models_status()
    return jsonify({**status, "banner": DEMO_BANNER if status.get("demo_mode") else None})


@blueprint.post("/models/<task>/install")
def install_model(task: str):
    """Body {"version": N}: serve a pending version now (admins only)."""
    version = (request.get_json(silent=True) or {}).get("version")
    if type(version) is not int:
        abort(400, description='the body must be {"version": <integer>}')
    return jsonify(_context().install_model(task, version, g.user))


@blueprint.get("/node")
def node():
    return jsonify(_context().data.node_status())
