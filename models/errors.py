"""Why a model package was refused, one class per reason (design.md §2).

Every refusal is a `ValueError`, so the CLI prints its one-line message and exits 2; callers that must react to a
reason (the registry turning a lost publish race into "version not newer", the node logging a demo refusal) catch
the subclass instead of parsing text.
"""

from __future__ import annotations


class PackageRefused(ValueError):
    """A model package that must not be loaded or published."""


class MalformedPackage(PackageRefused):
    """The package is not a package: missing manifest, unreadable manifest or signature file, broken tar."""


class UnsignedPackage(PackageRefused):
    """No `manifest.sig`: nobody vouches for the manifest."""


class TamperedPackage(PackageRefused):
    """The manifest no longer matches its signature, or a file no longer matches its hash in the manifest."""


class UntrustedSigner(PackageRefused):
    """A valid signature, but by a key this node does not trust."""


class DemoPackageRefused(PackageRefused):
    """An enrolled node runs only its publisher's packages, never demo ones."""


class UnlistedFile(PackageRefused):
    """A file or directory the manifest does not list: nothing unhashed rides along."""


class SymlinkInPackage(PackageRefused):
    """A symbolic or hard link: it could point the loader at bytes the signature never covered."""


class ExternalDataRefused(PackageRefused):
    """The ONNX graph keeps tensors in external files, which the manifest's hashes would not cover."""


class VersionNotNewer(PackageRefused):
    """The version is lower than or equal to the one already served for the task."""


class TaskNotAllowed(PackageRefused):
    """The package is for a task this node does not run."""
