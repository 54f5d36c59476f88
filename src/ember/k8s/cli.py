"""``ember k8s``: feature matrix, RuntimeClasses, overhead, webhook, certificates.

The group is self-contained (it reports :class:`EmberError` as one line and
exits with its code) so it works both under ``ember`` and as
``python -m ember.k8s``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from ember.errors import EmberError
from ember.util import atomic_write


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EmberError as exc:
            click.echo(f"ember k8s: {exc.message}", err=True)
            ctx.exit(exc.exit_code)


@click.group("k8s", cls=_Group)
def k8s_group() -> None:
    """Kubernetes integration: RuntimeClasses, admission webhook, support matrix."""


@k8s_group.command("features")
@click.option("--backend", type=click.Choice(["qemu", "firecracker"]), help="Only this backend.")
@click.option("--json", "as_json", is_flag=True, help="Print the matrix as JSON.")
@click.option("--write-doc", type=click.Path(dir_okay=False, path_type=Path),
              help="Regenerate the Markdown support document at PATH.")
def features_cmd(backend: str | None, as_json: bool, write_doc: Path | None) -> None:
    """Print the pod-feature support matrix (or regenerate its document)."""
    from ember.k8s.features import BACKENDS, FEATURES
    from ember.k8s.supportdoc import render

    if write_doc:
        atomic_write(write_doc, render())
        click.echo(f"wrote {write_doc}")
        return
    backends = (backend,) if backend else BACKENDS
    if as_json:
        click.echo(json.dumps([{"id": f.id, "title": f.title, "category": f.category,
                                **{b: f.on(b).__dict__ for b in backends}}
                               for f in FEATURES], indent=2))
        return
    width = max(len(f.id) for f in FEATURES)
    click.echo(f"{'FEATURE':<{width}}  " + "  ".join(f"{b.upper():<12}" for b in backends))
    for f in FEATURES:
        click.echo(f"{f.id:<{width}}  " + "  ".join(f"{f.on(b).status:<12}" for b in backends))


@k8s_group.command("runtimeclass")
@click.option("--class", "names", multiple=True, metavar="NAME",
              help="Only this class (ember-qemu, ember-fc); repeatable.")
@click.option("--memory", help="podFixed memory instead of the measured value (e.g. 160Mi).")
@click.option("--cpu", help="podFixed CPU instead of the measured value (e.g. 250m).")
def runtimeclass_cmd(names: tuple[str, ...], memory: str | None, cpu: str | None) -> None:
    """Print RuntimeClass manifests with the measured pod overhead."""
    from ember.config import load_config
    from ember.k8s import overhead, runtimeclass

    classes = runtimeclass.select(names)
    cache = {} if (memory and cpu) else overhead.load_cache(load_config())
    click.echo(runtimeclass.render(classes, cache, memory, cpu), nl=False)


@k8s_group.command("overhead")
@click.option("--measure", is_flag=True, help="Start a sandbox and measure it now.")
@click.option("--image", default="ember-demo:latest", show_default=True)
@click.option("--memory", default="256m", show_default=True, help="Guest RAM of the sandbox.")
@click.option("--cpus", default=1, show_default=True)
@click.option("--seconds", default=5.0, show_default=True, help="CPU sampling window.")
@click.option("--json", "as_json", is_flag=True, help="Print the full measurement as JSON.")
def overhead_cmd(measure: bool, image: str, memory: str, cpus: int, seconds: float,
                 as_json: bool) -> None:
    """Show (or, with --measure, take) the host-side cost of a sandbox."""
    from ember.config import load_config
    from ember.k8s import overhead

    cfg = load_config()
    if measure:
        result = overhead.measure(cfg, image, memory, cpus, seconds)
        path = overhead.save(cfg, result)
        results = {result["backend"]: result}
        click.echo(f"saved to {path}", err=True)
    else:
        results = overhead.load_cache(cfg)
        if not results:
            raise EmberError(f"no overhead measured yet ({overhead.cache_path(cfg)}): "
                             "run `ember k8s overhead --measure`")
    if as_json:
        click.echo(json.dumps(results, indent=2, sort_keys=True))
        return
    for backend, r in sorted(results.items()):
        click.echo(f"{backend}: memory {r['memory_bytes'] / overhead.MIB:.1f} MiB beyond "
                   f"{r['guest_memory_bytes'] / overhead.MIB:.0f} MiB guest RAM, "
                   f"cpu {r['cpu_millicores']}m idle ({r.get('accel', '?')}); podFixed memory "
                   f"{r['podFixed']['memory']} cpu {r['podFixed']['cpu']} "
                   f"(measured {r.get('measured_at', '?')})")


def _labels_source(namespace_labels: Path | None, kube_api: str | None,
                   kube_token_file: Path | None, kube_ca: Path | None):
    from ember.k8s import nslabels

    if namespace_labels and kube_api:
        raise EmberError("webhook: give --namespace-labels or --kube-api, not both")
    if namespace_labels:
        return nslabels.FileNamespaces(namespace_labels)
    if kube_api == "in-cluster" or (kube_api is None and os.environ.get(
            "KUBERNETES_SERVICE_HOST")):
        return nslabels.KubeNamespaces.in_cluster()
    if kube_api:
        if not kube_token_file:
            raise EmberError("webhook: --kube-api URL needs --kube-token-file")
        return nslabels.KubeNamespaces(kube_api, kube_token_file, kube_ca)
    return nslabels.NoNamespaces()


@k8s_group.command("webhook")
@click.option("--tls-cert", required=True, type=click.Path(dir_okay=False),
              help="Serving certificate (PEM, with chain).")
@click.option("--tls-key", required=True, type=click.Path(dir_okay=False),
              help="Private key (PEM).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False),
              help="Policy file (YAML or JSON); the default policy when omitted.")
@click.option("--port", default=8443, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--namespace-labels", type=click.Path(dir_okay=False, path_type=Path),
              help="File {namespace: {label: value}} instead of asking the API server.")
@click.option("--kube-api", help="API server URL, or 'in-cluster' (default inside a pod).")
@click.option("--kube-token-file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--kube-ca", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Load everything, print the policy, and exit.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--workers", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Threads serving connections; no client can make more.")
@click.option("--request-timeout", default=10.0, show_default=True,
              type=click.FloatRange(0.1, 300),
              help="Seconds a connection gets for its TLS handshake and each request.")
def webhook_cmd(tls_cert: str, tls_key: str, policy_file: str | None, port: int, host: str,
                namespace_labels: Path | None, kube_api: str | None,
                kube_token_file: Path | None, kube_ca: Path | None, check: bool,
                log_level: str, workers: int, request_timeout: float) -> None:
    """Serve the admission webhook over HTTPS (/mutate, /validate, /healthz, /metrics)."""
    from ember.k8s import policy as pol
    from ember.k8s import webhook

    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(message)s")
    policy = pol.load_policy(policy_file)
    ctx = webhook.tls_context(tls_cert, tls_key)
    source = _labels_source(namespace_labels, kube_api, kube_token_file, kube_ca)
    if check:
        click.echo(json.dumps(pol.policy_to_dict(policy), indent=2))
        return
    webhook.serve(host, port, ctx, policy, source, workers=workers,
                  request_timeout=request_timeout)


@k8s_group.command("certs")
@click.option("--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for ca.crt, tls.crt, tls.key.")
@click.option("--service", default="ember-webhook", show_default=True)
@click.option("--namespace", default="ember-system", show_default=True)
@click.option("--name", "extra", multiple=True, help="Extra DNS name or IP; repeatable.")
@click.option("--fill", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Webhook configuration manifest: print it with caBundle filled in.")
def certs_cmd(out_dir: Path, service: str, namespace: str, extra: tuple[str, ...],
              fill: Path | None) -> None:
    """Make the webhook's CA and serving certificate (and fill in caBundle)."""
    from ember.k8s import certs

    manifest = fill.read_text() if fill else None
    if manifest is not None:
        certs.fill_ca_bundle(manifest, b"check")  # fail before writing any file
    paths = certs.write_certs(out_dir, certs.service_names(service, namespace) + list(extra))
    click.echo(f"wrote {paths['ca']}, {paths['cert']}, {paths['key']}", err=True)
    if manifest is not None:
        click.echo(certs.fill_ca_bundle(manifest, paths["ca"].read_bytes()), nl=False)
