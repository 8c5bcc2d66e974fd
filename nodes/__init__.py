"""ComfyUI nodes of AdaptToken: thin wrappers on the library, one file per domain.

Importing this package imports nothing from ComfyUI: `nodes.spec` (the schemas as plain data) is
readable anywhere; `nodes.extension` and the node modules need a running ComfyUI, and import the
library relatively (`from .. import adapttoken`): they load as part of the pack, never as a
top-level `nodes` package.
"""
