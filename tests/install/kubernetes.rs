//! deploy/kubernetes: the base and the cluster overlay rendered by `kubectl kustomize`,
//! validated against the Kubernetes schemas (kubernetes-validate, strict), and read
//! back for what the schemas cannot say (probes, Secret references, the configuration).

use std::{path::Path, process::Command};

use serde_json::Value;

use crate::support::{self, output, repo, run};

/// The rendered manifests of `dir`, as YAML.
fn render(dir: &str) -> String {
    run(Command::new("kubectl").arg("kustomize").arg(repo(dir)))
}

/// kubernetes-validate --strict on `yaml`; (success, output).
fn validate(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, yaml).expect("write");
    let out = output(
        Command::new("kubernetes-validate")
            .arg("--strict")
            .arg(&file),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The documents of `yaml` as JSON (PyYAML, which kubernetes-validate brings).
fn documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The one container of the StatefulSet.
fn container(docs: &[Value]) -> &Value {
    let sets = find(docs, "StatefulSet");
    assert_eq!(sets.len(), 1);
    &sets[0]["spec"]["template"]["spec"]["containers"][0]
}

/// The Secret that the container's environment variable `name` reads, and its key.
fn secret_of<'a>(docs: &'a [Value], name: &str) -> (&'a Value, String) {
    let env = container(docs)["env"].as_array().expect("env");
    let var = env
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name}"));
    let reference = &var["valueFrom"]["secretKeyRef"];
    let secret = find(docs, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == reference["name"])
        .unwrap_or_else(|| panic!("{name}: no Secret {}", reference["name"]));
    let key = reference["key"].as_str().expect("key").to_owned();
    assert!(
        secret["data"].get(&key).is_some(),
        "{name}: Secret has no {key}"
    );
    (secret, key)
}

#[test]
fn kubernetes_manifests_render_validate_and_agree_with_the_service() {
    if !support::can_run(
        "the Kubernetes manifests test",
        &["kubectl", "kubernetes-validate", "python3"],
        false,
    ) {
        return;
    }
    // `labels` and `patches` in the kustomizations need kustomize v5 (kubectl 1.27+);
    // Debian 12's kubernetes-client is 1.20.
    let version = run(Command::new("kubectl").args(["version", "--client"]));
    let kustomize = version
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    if kustomize.is_none_or(|major| major < 5) {
        let why = format!("kubectl's kustomize is not v5 or newer:\n{version}");
        assert!(
            std::env::var_os("LINK_COUNTER_REQUIRE_INSTALL_TOOLS").is_none(),
            "{why}"
        );
        eprintln!("skipped the Kubernetes manifests test: {why}");
        return;
    }
    for dir in ["deploy/kubernetes/base", "deploy/kubernetes/cluster"] {
        let yaml = render(dir);
        let (ok, report) = validate(&yaml);
        assert!(ok, "{dir}:\n{report}");
        let docs = documents(&yaml);
        let kinds: Vec<&str> = docs
            .iter()
            .map(|d| d["kind"].as_str().expect("kind"))
            .collect();
        for kind in [
            "StatefulSet",
            "Service",
            "Ingress",
            "ConfigMap",
            "Secret",
            "PodDisruptionBudget",
        ] {
            assert!(kinds.contains(&kind), "{dir}: no {kind} in {kinds:?}");
        }

        let set = find(&docs, "StatefulSet")[0];
        assert_eq!(
            set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"],
            "data"
        );
        let c = container(&docs);
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{dir}");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{dir}");
        secret_of(&docs, "LINK_COUNTER__ADMIN__TOKEN");

        // The ConfigMap's config.toml is a valid configuration listening inside the pod
        // and keeping its data on the pod's volume.
        let config = find(&docs, "ConfigMap")[0]["data"]["config.toml"]
            .as_str()
            .expect("config.toml");
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("config.toml");
        std::fs::write(&path, config).expect("write");
        let s = link_counter::Settings::load_from(Some(&path), Vec::new()).expect("config loads");
        assert_eq!(s.server.bind.port(), 1999);
        assert!(s.server.bind.ip().is_unspecified());
        assert_eq!(s.storage.path, Path::new("/data"));
        assert!(c["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["name"] == "data" && m["mountPath"] == "/data"));

        let ingress = find(&docs, "Ingress")[0];
        let annotations = &ingress["metadata"]["annotations"];
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"],
            "300"
        );
        assert_eq!(
            annotations["nginx.ingress.kubernetes.io/upstream-hash-by"],
            "$arg_visitor"
        );

        if dir.ends_with("cluster") {
            assert!(set["spec"]["replicas"].as_u64().expect("replicas") > 1);
            let (secret, key) = secret_of(&docs, "LINK_COUNTER__CLUSTER__REDIS_URL");
            assert_eq!(key, "url");
            assert!(secret["data"]["url"].is_string());
        } else {
            assert_eq!(set["spec"]["replicas"], 1, "one node without Redis");
        }
    }

    // The validator rejects what the schema forbids (a probe on a port given as a list).
    let yaml = render("deploy/kubernetes/base").replacen("port: http", "port: [http]", 1);
    let (ok, report) = validate(&yaml);
    assert!(!ok, "a broken manifest passed:\n{report}");
}
