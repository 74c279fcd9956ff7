//! The install paths of docs/DEPLOY.md, each run for real: the container image
//! (podman), the compose file's two profiles (podman-compose), the Debian package
//! (dpkg, as root) and the Kubernetes manifests (kubectl kustomize, kubernetes-validate).
//!
//! Skip rule: a test whose tools are missing here (or that needs root) prints one line
//! and passes, unless `LINK_COUNTER_REQUIRE_INSTALL_TOOLS` is set (.ci/run sets it,
//! after installing them), in which case it fails. The image tests build the release
//! binary (`cargo build --release`) once and wrap it in the image's `prebuilt` stage:
//! no registry is reached, and the images the Containerfile and compose file name
//! from Docker Hub (debian:bookworm-slim, redis, nginx) are made locally from Debian's
//! packages when missing (tests/install/stand-ins.sh).

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;
#[path = "../kit/mod.rs"]
#[allow(dead_code)] // each target uses a part of the kit
mod kit;

mod compose;
mod container;
mod deb;
mod kubernetes;
mod support;
