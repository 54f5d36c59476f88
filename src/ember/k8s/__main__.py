"""``python -m ember.k8s``: the ``ember k8s`` group on its own."""

from ember.k8s.cli import k8s_group

if __name__ == "__main__":
    k8s_group(prog_name="ember k8s")
