//! deploy/, checked offline. Every manifest parses; every RUNNEL_* variable a manifest
//! sets is one runnel knows, and its value passes runnel's own validation (with the
//! mounted secret files replaced by real PEM files); the probes and the Prometheus
//! sidecar look at RUNNEL_METRICS_ADDR's port, never at $PORT; the Cloud Run, IAM and
//! Istio pieces agree with each other and with runnel's demo identity; and the
//! resources validate against schemas where one can be had offline: kubernetes-validate
//! for core kinds (and for the Cloud Run containers seen as a Pod), the Istio CRD
//! schemas kept in tests/deploy/ for Gateway, VirtualService and AuthorizationPolicy.
//! Cloud Run's own API (knative Service, run.googleapis.com Job) has no public schema;
//! the checks below are what stands in for it.

mod support;

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use runnel::{
    Config,
    config::{VARS, Warnings},
    demo::{self, Pki},
};
use serde_json::{Value, json};
use support::process::{TempDir, missing_peer, peer};

/// The label runnel's own gateway carries, and its namespace.
const GATEWAY_LABEL: &str = "runnel-gateway";
const GATEWAY_NAMESPACE: &str = "runnel-gateway";
/// Where every gateway replica mounts the session-ticket keys, and their Secret.
const TICKET_DIR: &str = "/etc/runnel-ticket-keys";
const TICKET_SECRET: &str = "runnel-gateway-ticket-keys";
const GLOBAL_ACCESS: &str = "networking.gke.io/internal-load-balancer-allow-global-access";
/// Trust domains a mesh uses: Istio's default (and its alias for the local trust domain)
/// and Cloud Service Mesh's for the guide's project (any PROJECT.svc.id.goog is refused).
const MESH_TRUST_DOMAINS: [&str; 2] = ["cluster.local", "my-project.svc.id.goog"];
const METRICS_PATHS: [(&str, &str); 2] =
    [("startupProbe", "/readyz"), ("livenessProbe", "/healthz")];
/// Cloud Run sends SIGKILL this long after SIGTERM.
const CLOUD_RUN_GRACE_SECONDS: u64 = 10;

#[test]
fn every_manifest_parses_and_names_what_it_is() {
    let all = manifests();
    for expected in [
        "cloudrun/service.yaml",
        "cloudrun/runmonitoring.yaml",
        "cloudrun/invoker-policy.yaml",
        "cloudrun/check-job.yaml",
        "istio/namespace.yaml",
        "istio/gateway-deployment.yaml",
        "istio/gateway-service.yaml",
        "istio/session-tickets.yaml",
        "istio/gateway.yaml",
        "istio/authorization-policy.yaml",
        "istio/virtualservice.yaml",
    ] {
        assert!(
            all.iter().any(|m| m.file == expected),
            "deploy/{expected} missing"
        );
    }
    assert!(
        deploy_dir().join("README.md").is_file(),
        "deploy/README.md missing"
    );
    for m in &all {
        if m.doc.get("bindings").is_some() {
            continue; // an IAM policy has no kind
        }
        for key in ["apiVersion", "kind"] {
            assert!(m.doc[key].is_string(), "{}: no {key}", m.file);
        }
        assert!(
            m.doc["metadata"]["name"].is_string(),
            "{}: no metadata.name",
            m.file
        );
    }
}

#[test]
fn every_runnel_variable_in_a_manifest_is_known_and_valid() {
    for (file, pod) in cloud_run_pods() {
        let (config, warnings) = runnel_config(pod).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(warnings.is_empty(), "{file}: {warnings:?}");
        assert!(config.metrics_addr.is_some(), "{file}: metrics are off");
    }
}

#[test]
fn a_bad_variable_in_a_manifest_is_reported_by_name() {
    for (name, value, expected) in [
        ("RUNNEL_DRAIN_TIMEOUT", "8 s", "RUNNEL_DRAIN_TIMEOUT: "),
        ("RUNNEL_DRAIN_TIMOUT", "8s", "RUNNEL_DRAIN_TIMOUT: "),
        (
            "RUNNEL_TLS_KEY_FILE",
            "/secrets/cert/client-key.pem",
            "RUNNEL_TLS_KEY_FILE: ",
        ),
    ] {
        let mut service = find("cloudrun/service.yaml").clone();
        let runnel = &mut service["spec"]["template"]["spec"]["containers"][0];
        let env = runnel["env"].as_array_mut().unwrap();
        env.retain(|e| e["name"] != name);
        env.push(json!({"name": name, "value": value}));
        let pod = &service["spec"]["template"]["spec"];
        let error = runnel_config(pod).err();
        let error = error.unwrap_or_else(|| panic!("{name}={value} passed"));
        assert!(error.starts_with(expected), "{name}={value}: {error}");
    }
}

#[test]
fn probes_and_the_scrape_use_the_metrics_port_not_the_container_port() {
    let service = find("cloudrun/service.yaml");
    let pod = &service["spec"]["template"]["spec"];
    let (config, _) = runnel_config(pod).unwrap();
    let metrics = u64::from(config.metrics_addr.unwrap().port());
    let runnel = container(pod, "runnel");
    let container_port = runnel["ports"][0]["containerPort"].as_u64().unwrap();
    assert_ne!(
        metrics, container_port,
        "metrics on $PORT would be tunnelled"
    );
    assert_eq!(u64::from(config.listen.port()), container_port);
    for (probe, path) in METRICS_PATHS {
        let get = &runnel[probe]["httpGet"];
        assert_eq!(get["port"].as_u64(), Some(metrics), "{probe} port");
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
    }
    let monitoring = find("cloudrun/runmonitoring.yaml");
    let endpoints = monitoring["spec"]["endpoints"].as_array().unwrap();
    assert!(!endpoints.is_empty(), "RunMonitoring scrapes nothing");
    for endpoint in endpoints {
        let port = match &endpoint["port"] {
            Value::String(s) => s.parse().ok(),
            other => other.as_u64(),
        };
        assert_eq!(port, Some(metrics), "scrape port in {endpoint}");
        let path = endpoint["path"].as_str().unwrap_or("/metrics");
        assert_eq!(path, "/metrics");
    }
}

#[test]
fn run_monitoring_uses_only_fields_the_sidecar_accepts() {
    // The sidecar (run-gmp-sidecar, confgenerator/config.go) parses its config strictly
    // and stops on an unknown field; these are the fields it knows.
    let m = find("cloudrun/runmonitoring.yaml");
    assert_eq!(m["apiVersion"], "monitoring.googleapis.com/v1beta");
    assert_eq!(m["kind"], "RunMonitoring");
    only_keys(
        m,
        &["apiVersion", "kind", "metadata", "spec"],
        "RunMonitoring",
    );
    only_keys(&m["spec"], &["endpoints", "targetLabels", "limits"], "spec");
    let endpoint_keys = [
        "port",
        "scheme",
        "path",
        "params",
        "proxyUrl",
        "interval",
        "timeout",
        "metricRelabeling",
    ];
    for endpoint in m["spec"]["endpoints"].as_array().unwrap() {
        only_keys(endpoint, &endpoint_keys, "endpoint");
        let interval = endpoint["interval"].as_str().unwrap_or("30s");
        runnel::config::parse_duration(interval).unwrap();
    }
    let allowed = ["instance", "revision", "service", "configuration"];
    for label in m["spec"]["targetLabels"]["metadata"].as_array().unwrap() {
        assert!(
            allowed.contains(&label.as_str().unwrap()),
            "targetLabels {label}"
        );
    }
    // ...and the sidecar finds it where it looks: /etc/rungmp/config.yaml.
    let pod = &find("cloudrun/service.yaml")["spec"]["template"]["spec"];
    let collector = container(pod, "collector");
    secret_file(pod, collector, "/etc/rungmp/config.yaml").unwrap();
}

#[test]
fn cloud_run_service_stays_warm_with_cpu_and_a_private_path_to_the_gateway() {
    let service = find("cloudrun/service.yaml");
    let template = &service["spec"]["template"];
    let a = |key: &str| -> &str {
        template["metadata"]["annotations"][key]
            .as_str()
            .unwrap_or_else(|| panic!("template annotation {key} missing or not a string"))
    };
    let min: u32 = a("autoscaling.knative.dev/minScale").parse().unwrap();
    assert!(min >= 1, "minScale {min}: the pool would go cold");
    assert_eq!(a("run.googleapis.com/cpu-throttling"), "false");
    assert_eq!(a("run.googleapis.com/startup-cpu-boost"), "true");
    let interfaces: Value =
        serde_json::from_str(a("run.googleapis.com/network-interfaces")).unwrap();
    let interface = &interfaces.as_array().expect("a JSON list")[0];
    assert!(interface["network"].is_string() || interface["subnetwork"].is_string());
    let egress = a("run.googleapis.com/vpc-access-egress");
    assert!(
        ["private-ranges-only", "all-traffic"].contains(&egress),
        "{egress}"
    );
    let dependencies: Value =
        serde_json::from_str(a("run.googleapis.com/container-dependencies")).unwrap();
    assert_eq!(dependencies, json!({"collector": ["runnel"]}));
    let port_name = container(&template["spec"], "runnel")["ports"][0]["name"].as_str();
    assert!(
        matches!(port_name, Some("http1" | "h2c")),
        "port name {port_name:?}"
    );
    let timeout = template["spec"]["timeoutSeconds"].as_u64().unwrap();
    assert!(
        timeout >= 900,
        "request timeout {timeout}s is short for streams"
    );
    for volume in template["spec"]["volumes"].as_array().unwrap() {
        for item in volume["secret"]["items"].as_array().unwrap() {
            assert_eq!(item["key"], "latest", "{volume}");
        }
    }
}

#[test]
fn drain_ends_before_cloud_run_kills_the_instance() {
    for (file, pod) in cloud_run_pods() {
        let (config, _) = runnel_config(pod).unwrap();
        assert!(
            config.drain_timeout.as_secs() < CLOUD_RUN_GRACE_SECONDS,
            "{file}: RUNNEL_DRAIN_TIMEOUT {:?} outlasts Cloud Run's {CLOUD_RUN_GRACE_SECONDS} s",
            config.drain_timeout
        );
    }
}

#[test]
fn only_the_front_end_may_invoke_runnel() {
    let service = find("cloudrun/service.yaml");
    let ingress = &service["metadata"]["annotations"]["run.googleapis.com/ingress"];
    assert_eq!(ingress, "internal");
    let policy = find("cloudrun/invoker-policy.yaml");
    let bindings = policy["bindings"].as_array().unwrap();
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    assert_eq!(bindings[0]["role"], "roles/run.invoker");
    let members = bindings[0]["members"].as_array().unwrap();
    assert!(!members.is_empty());
    for member in members {
        let member = member.as_str().unwrap();
        assert!(member.starts_with("serviceAccount:"), "invoker {member}");
    }
    for m in manifests() {
        let text = m.doc.to_string();
        for public in ["allUsers", "allAuthenticatedUsers"] {
            assert!(!text.contains(public), "{} grants {public}", m.file);
        }
    }
}

#[test]
fn check_job_runs_with_the_service_configuration() {
    let service = &find("cloudrun/service.yaml")["spec"]["template"];
    let job = &find("cloudrun/check-job.yaml")["spec"]["template"];
    let (service_pod, job_pod) = (&service["spec"], &job["spec"]["template"]["spec"]);
    let (runnel, check) = (
        container(service_pod, "runnel"),
        container(job_pod, "runnel"),
    );
    assert_eq!(check["args"], json!(["check"]));
    for key in ["image", "env", "volumeMounts"] {
        assert_eq!(check[key], runnel[key], "container {key} differs");
    }
    for key in ["serviceAccountName", "volumes"] {
        let volumes = |pod: &Value| -> Value {
            let mut v = pod[key].clone();
            if let Some(list) = v.as_array_mut() {
                list.retain(|vol| vol["name"] != "monitoring-config");
            }
            v
        };
        assert_eq!(volumes(job_pod), volumes(service_pod), "{key} differs");
    }
    for key in [
        "run.googleapis.com/network-interfaces",
        "run.googleapis.com/vpc-access-egress",
        "run.googleapis.com/execution-environment",
    ] {
        let annotation = |t: &Value| t["metadata"]["annotations"][key].clone();
        assert_eq!(annotation(job), annotation(service), "{key} differs");
    }
}

#[test]
fn the_gateway_admits_exactly_runnel_s_own_identity_outside_the_mesh_s_trust_domain() {
    let gateway = find("istio/gateway.yaml");
    let server = &gateway["spec"]["servers"][0];
    assert_eq!(server["tls"]["mode"], "MUTUAL");
    assert!(
        server["tls"]["credentialName"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    let policy = find("istio/authorization-policy.yaml");
    assert_eq!(policy["spec"]["action"], "ALLOW");
    let rules = policy["spec"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "one rule: {rules:?}");
    let principals = &rules[0]["from"][0]["source"]["principals"];
    let principal = principals[0].as_str().unwrap();
    assert_eq!(principals, &json!([principal]), "exactly one principal");
    // The identity the guide puts in runnel's certificate, in every command that issues it.
    let guide = guide();
    let sans: BTreeSet<&str> = guide
        .match_indices("spiffe://")
        .map(|(i, _)| {
            let rest = &guide[i..];
            let end = rest
                .find(|c: char| c.is_whitespace() || "`'\\\")".contains(c))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|san| *san != "spiffe://")
        .collect();
    let issued = format!("spiffe://{principal}");
    assert!(
        sans.contains(issued.as_str()),
        "the guide issues no certificate for {issued}: {sans:?}"
    );
    for san in &sans {
        assert!(
            *san == issued || *san == "spiffe://cluster.local/ns/runnel/sa/runnel",
            "the guide names another identity, {san}"
        );
    }
    let parts: Vec<&str> = principal.split('/').collect();
    let trust_domain = parts[0];
    assert!(
        !MESH_TRUST_DOMAINS.contains(&trust_domain) && !trust_domain.ends_with(".svc.id.goog"),
        "{principal}: a mesh trust domain, which Istio rewrites to the mesh's own"
    );
    // Istio's trust-domain rewrite (pilot/pkg/security/trustdomain/bundle.go) applies
    // only to principals of the form TD/ns/NS/sa/SA; this one must never take that form.
    assert_ne!(parts.len(), 5, "{principal}: has the form Istio rewrites");
    assert!(
        !principal.contains('*') && !principal.starts_with("spiffe://"),
        "{principal}: not an exact principal"
    );
    // runnel's demo PKI still carries a mesh-style identity; the deployed one must not.
    assert_ne!(issued, demo::CLIENT_SPIFFE_ID);
    // The CA the gateway checks runnel with is the client CA, and runnel's own trust is
    // the gateway CA: two CAs, neither the mesh's.
    for needle in [
        "--from-file=ca.crt=pki/client-ca.pem",
        "--data-file pki/gateway-ca.pem",
        "-CA client-ca.pem",
        "-CA gateway-ca.pem",
    ] {
        assert!(guide.contains(needle), "the guide lacks {needle:?}");
    }
}

#[test]
fn no_manifest_selects_or_replaces_the_default_ingress_gateway() {
    for m in manifests() {
        let text = m.doc.to_string();
        for default in [
            "\"istio\":\"ingressgateway\"",
            "istio-ingressgateway",
            "\"istio-system\"",
        ] {
            assert!(
                !text.contains(default),
                "deploy/{}: {} touches the default gateway ({default})",
                m.file,
                m.doc["kind"]
            );
        }
    }
    assert!(
        !deploy_dir()
            .join("istio/ingressgateway-service.yaml")
            .exists(),
        "the istio-ingressgateway Service patch is back"
    );
}

#[test]
fn runnel_s_gateway_is_complete_and_every_istio_resource_selects_it() {
    let gateway = find("istio/gateway.yaml");
    let selector = gateway["spec"]["selector"].as_object().unwrap();
    assert_eq!(json!(selector), json!({"istio": GATEWAY_LABEL}));
    let namespace = &gateway["metadata"]["namespace"];
    assert_eq!(namespace, GATEWAY_NAMESPACE);
    assert_eq!(
        find_kind("istio/namespace.yaml", "Namespace")["metadata"]["name"],
        *namespace
    );

    let deployment = find_kind("istio/gateway-deployment.yaml", "Deployment");
    let template = &deployment["spec"]["template"];
    let pod_labels = template["metadata"]["labels"].as_object().unwrap();
    let has_labels = |labels: &Value, what: &str| {
        for (key, value) in labels
            .as_object()
            .unwrap_or_else(|| panic!("{what}: no labels"))
        {
            assert_eq!(
                pod_labels.get(key),
                Some(value),
                "{what} selects {key}={value}"
            );
        }
    };
    has_labels(&json!(selector), "the Gateway");
    has_labels(
        &deployment["spec"]["selector"]["matchLabels"],
        "the Deployment",
    );
    assert_eq!(
        template["metadata"]["annotations"]["inject.istio.io/templates"],
        "gateway"
    );
    assert_eq!(
        pod_labels.get("sidecar.istio.io/inject"),
        Some(&json!("true"))
    );
    let proxy = container(&template["spec"], "istio-proxy");
    assert_eq!(
        proxy["image"], "auto",
        "the injector fills in the proxy image"
    );

    let policy = find("istio/authorization-policy.yaml");
    has_labels(
        &policy["spec"]["selector"]["matchLabels"],
        "the AuthorizationPolicy",
    );
    let filter = find_kind("istio/session-tickets.yaml", "EnvoyFilter");
    has_labels(
        &filter["spec"]["workloadSelector"]["labels"],
        "the EnvoyFilter",
    );
    assert_eq!(
        policy["spec"]["selector"]["matchLabels"],
        json!(selector),
        "the policy selects exactly the gateway"
    );

    let service = find("istio/gateway-service.yaml");
    has_labels(&service["spec"]["selector"], "the Service");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(
        service["spec"]["loadBalancerClass"],
        "networking.gke.io/l4-regional-internal"
    );
    let annotations = service["metadata"]["annotations"].as_object();
    assert!(
        !annotations.is_some_and(|a| a.contains_key(GLOBAL_ACCESS)),
        "global access is on"
    );

    let hpa = find_kind("istio/gateway-deployment.yaml", "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let min = hpa["spec"]["minReplicas"].as_u64().unwrap();
    assert!(
        min >= 2,
        "minReplicas {min}: one replica lost is the gateway lost"
    );
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "the HPA owns the replica count"
    );
    let pdb = find_kind("istio/gateway-deployment.yaml", "PodDisruptionBudget");
    has_labels(
        &pdb["spec"]["selector"]["matchLabels"],
        "the PodDisruptionBudget",
    );
    let min_available = pdb["spec"]["minAvailable"].as_u64().unwrap_or(0);
    assert!(
        min_available >= 1 && min_available < min,
        "PDB minAvailable {min_available}"
    );

    for m in manifests() {
        if m.file.starts_with("istio/") && m.doc["kind"] != "Namespace" {
            let expected = if m.file == "istio/virtualservice.yaml" {
                json!("hello")
            } else {
                namespace.clone()
            };
            assert_eq!(
                m.doc["metadata"]["namespace"], expected,
                "deploy/{} namespace",
                m.file
            );
        }
    }
    // The minimum Istio version the guide states is the one the API versions need.
    let guide = guide();
    assert!(
        guide.contains("Istio 1.22 or later"),
        "the guide states no Istio version"
    );
    for m in manifests() {
        let api = m.doc["apiVersion"].as_str().unwrap_or_default();
        if api.contains(".istio.io/") {
            assert!(
                api.ends_with("/v1") || api == "networking.istio.io/v1alpha3",
                "deploy/{}: {api} is not served by Istio 1.22",
                m.file
            );
        }
    }
}

#[test]
fn every_gateway_replica_mounts_the_same_session_ticket_keys() {
    let deployment = find_kind("istio/gateway-deployment.yaml", "Deployment");
    // Every replica is made from this one pod template (no per-replica volumes).
    assert_eq!(deployment["kind"], "Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let proxy = container(pod, "istio-proxy");
    let mount = proxy["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == TICKET_DIR)
        .unwrap_or_else(|| panic!("istio-proxy does not mount {TICKET_DIR}"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    let secret = &volume["secret"];
    assert_eq!(secret["secretName"], TICKET_SECRET, "{volume}");
    assert!(secret["optional"] != true, "the ticket keys are optional");
    let files: Vec<String> = secret["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{TICKET_DIR}/{}", i["path"].as_str().unwrap()))
        .collect();

    // The EnvoyFilter reads that Secret's SDS file, watches its directory, and patches
    // the TLS filter chain of the Gateway's server, on the gateway.
    let filter = find("istio/session-tickets.yaml");
    let patches = filter["spec"]["configPatches"].as_array().unwrap();
    assert_eq!(patches.len(), 1);
    let patch = &patches[0];
    assert_eq!(patch["applyTo"], "FILTER_CHAIN");
    assert_eq!(patch["match"]["context"], "GATEWAY");
    assert_eq!(patch["patch"]["operation"], "MERGE");
    let sni = patch["match"]["listener"]["filterChain"]["sni"].as_str();
    let gateway = find("istio/gateway.yaml");
    assert_eq!(
        sni,
        gateway["spec"]["servers"][0]["hosts"][0].as_str(),
        "patched SNI"
    );
    let socket = &patch["patch"]["value"]["transport_socket"];
    assert_eq!(socket["name"], "envoy.transport_sockets.tls");
    let sds_config = &socket["typed_config"]["session_ticket_keys_sds_secret_config"];
    let source = &sds_config["sds_config"]["path_config_source"];
    let path = source["path"].as_str().unwrap().to_owned();
    assert!(
        files.contains(&path),
        "{path} is not a file of {TICKET_SECRET}"
    );
    assert_eq!(source["watched_directory"]["path"], TICKET_DIR);

    // What ticket-keys.sh puts in the Secret: the resource the EnvoyFilter names, with
    // two inline 80-byte keys (Envoy applies a reload only when the resource changes, so
    // the keys are in it, not in files it names), and a rotation keeps the old first key
    // as the second.
    let Some(openssl) = peer("TEST_OPENSSL_BIN", "openssl") else {
        return;
    };
    let scratch = TempDir::new("ticket-keys");
    let fresh = ticket_keys(&openssl, None);
    let keys = |sds: &str| -> Vec<String> {
        let sds: Value = serde_yaml_ng::from_str(sds).expect("ticket-keys.sh output parses");
        let resource = &sds["resources"][0];
        assert_eq!(
            resource["@type"],
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
        );
        assert_eq!(resource["name"], sds_config["name"], "SDS resource name");
        let keys: Vec<String> = resource["session_ticket_keys"]["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["inline_bytes"].as_str().expect("inline keys").to_owned())
            .collect();
        for key in &keys {
            // 80 bytes are 108 base64 characters, the last one padding.
            assert_eq!((key.len(), key.matches('=').count()), (108, 1), "{key}");
        }
        keys
    };
    let first = keys(&fresh);
    assert_eq!(first.len(), 2);
    assert_ne!(first[0], first[1]);
    let previous = scratch.path().join("previous.yaml");
    std::fs::write(&previous, &fresh).unwrap();
    let rotated = keys(&ticket_keys(&openssl, Some(&previous)));
    assert_eq!(rotated[1], first[0], "the rotation keeps the old first key");
    assert!(
        !first.contains(&rotated[0]),
        "the rotation brings a fresh key"
    );
}

#[test]
fn cpu_limits_are_whole_vcpus_as_cloud_run_requires() {
    for (file, pod) in cloud_run_pods() {
        let mut total = 0.0;
        for c in pod["containers"].as_array().unwrap() {
            let cpu = c["resources"]["limits"]["cpu"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: {} has no CPU limit (as a string)", c["name"]));
            let cpu: f64 = match cpu.strip_suffix('m') {
                Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
                None => cpu.parse().unwrap(),
            };
            // Below 1 needs request-based billing, concurrency 1 and gen1: not runnel.
            assert!(
                cpu >= 1.0 && cpu.fract() == 0.0,
                "{file}: {} CPU {cpu}: must be a whole number of vCPU",
                c["name"]
            );
            total += cpu;
        }
        assert!(total <= 8.0, "{file}: {total} vCPU in all");
    }
}

#[test]
fn the_egress_subnet_holds_a_rollout_and_the_check_job() {
    let guide = guide();
    let create = guide
        .lines()
        .skip_while(|l| !l.contains("gcloud compute networks subnets create runnel-egress"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let range = create
        .split("--range ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("the guide creates no runnel-egress range: {create}"));
    let prefix: u32 = range.split('/').nth(1).unwrap().parse().unwrap();
    assert!(prefix <= 24, "{range}: the guide advises /24 or larger");
    let usable = 2u64.pow(32 - prefix) - 4;
    let service = find("cloudrun/service.yaml");
    let max: u64 =
        service["spec"]["template"]["metadata"]["annotations"]["autoscaling.knative.dev/maxScale"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
    let job = find("cloudrun/check-job.yaml");
    let tasks = job["spec"]["template"]["spec"]["taskCount"]
        .as_u64()
        .unwrap_or(1);
    let needed = 2 * (2 * max + tasks);
    assert!(
        usable >= needed,
        "{range}: {usable} addresses, {needed} needed"
    );
    let lb = find("istio/gateway-service.yaml");
    assert_eq!(
        lb["spec"]["loadBalancerSourceRanges"],
        json!([range]),
        "the load balancer admits the egress subnet only"
    );
}

#[test]
fn the_guide_runs_in_sh_names_real_files_and_says_what_an_operator_does_by_hand() {
    let guide = guide();
    // Commands (inside code fences) must run in sh: no process substitution.
    let mut in_code = false;
    for line in guide.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
        } else if in_code {
            assert!(
                !line.contains("<("),
                "sh has no process substitution: {line}"
            );
        }
    }
    assert!(!guide.contains("on distroless"), "the image is scratch");
    let dockerfile = std::fs::read_to_string(deploy_dir().join("../Dockerfile")).unwrap();
    assert!(dockerfile.lines().any(|l| l == "FROM scratch"));
    // Every deploy/ file the guide names exists.
    for (i, _) in guide.match_indices(".yaml") {
        let start = guide[..i]
            .rfind(|c: char| c.is_whitespace() || "`(|".contains(c))
            .map_or(0, |s| s + 1);
        let name = &guide[start..i + 5];
        let path = name.strip_prefix("deploy/").unwrap_or(name);
        if path.starts_with("cloudrun/") || path.starts_with("istio/") {
            assert!(deploy_dir().join(path).is_file(), "the guide names {name}");
        }
    }
    for needle in [
        // Cloud Run's reserved paths.
        "/eventlog",
        "/_ah/",
        "/healthz",
        // Firewall from the egress subnet and from Google's health checks.
        "gcloud compute firewall-rules create",
        "35.191.0.0/16,130.211.0.0/22",
        // IAM: runnel reads its secrets, the deployer acts as runnel, Shared VPC.
        "roles/secretmanager.secretAccessor",
        "roles/iam.serviceAccountUser",
        "roles/compute.networkUser",
        "Shared VPC",
    ] {
        assert!(guide.contains(needle), "the guide lacks {needle:?}");
    }
    assert!(guide.contains("--source-ranges 10.20.0.0/24"));
}

#[test]
fn the_metrics_sidecar_is_a_pinned_current_release() {
    let pod = &find("cloudrun/service.yaml")["spec"]["template"]["spec"];
    let image = container(pod, "collector")["image"].as_str().unwrap();
    let (name, tag) = image.rsplit_once(':').unwrap();
    assert!(name.ends_with("/cloud-run-gmp-sidecar"), "{image}");
    let version: Vec<u32> = tag
        .split('.')
        .map(|p| {
            p.parse()
                .unwrap_or_else(|_| panic!("{image}: not a release tag"))
        })
        .collect();
    assert!(version >= vec![1, 7, 0], "{image}: older than 1.7.0");
}

#[test]
fn runnel_reaches_the_gateway_server_it_is_configured_for() {
    let pod = &find("cloudrun/service.yaml")["spec"]["template"]["spec"];
    let (config, _) = runnel_config(pod).unwrap();
    let gateway = find("istio/gateway.yaml");
    let server = &gateway["spec"]["servers"][0];
    let port = u64::from(config.upstream.port);
    assert_eq!(
        server["port"]["number"].as_u64(),
        Some(port),
        "gateway port"
    );
    let service = find("istio/gateway-service.yaml");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert!(
        ports.iter().any(|p| p["port"].as_u64() == Some(port)),
        "LB port {port}"
    );
    let hosts: Vec<&str> = server["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    let sni = config.server_name.to_str();
    assert!(
        hosts.iter().any(|h| host_matches(h, &sni)),
        "SNI {sni} not in {hosts:?}"
    );
    let route = find("istio/virtualservice.yaml");
    let gateway_ref = format!(
        "{}/{}",
        gateway["metadata"]["namespace"].as_str().unwrap(),
        gateway["metadata"]["name"].as_str().unwrap()
    );
    assert_eq!(route["spec"]["gateways"], json!([gateway_ref]));
    for host in route["spec"]["hosts"].as_array().unwrap() {
        let host = host.as_str().unwrap();
        assert!(
            hosts.iter().any(|h| host_matches(h, host)),
            "{host} not in {hosts:?}"
        );
    }
}

#[test]
fn kubernetes_resources_and_cloud_run_containers_validate_with_kubernetes_validate() {
    let Some(tool) = peer("KUBERNETES_VALIDATE", "kubernetes-validate") else {
        return;
    };
    let scratch = TempDir::new("kubernetes-validate");
    // One resource per file, so that each "passed" line is one document.
    let mut files: Vec<PathBuf> = manifests()
        .iter()
        .filter(|m| is_core_kind(&m.doc))
        .enumerate()
        .map(|(i, m)| {
            let path = scratch
                .path()
                .join(format!("{i}-{}.json", m.file.replace(['/', '.'], "-")));
            std::fs::write(&path, m.doc.to_string()).unwrap();
            path
        })
        .collect();
    assert!(!files.is_empty(), "no core Kubernetes resource in deploy/");
    for (file, pod) in cloud_run_pods() {
        let name = file.replace(['/', '.'], "-");
        let as_pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "serviceAccountName": pod["serviceAccountName"],
                "containers": pod["containers"],
                "volumes": pod["volumes"],
            },
        });
        let path = scratch.path().join(format!("{name}.json"));
        std::fs::write(&path, as_pod.to_string()).unwrap();
        files.push(path);
    }
    let output = Command::new(tool)
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubernetes-validate:\n{text}");
    let passed = text.lines().filter(|l| l.contains(" passed ")).count();
    assert_eq!(passed, files.len(), "kubernetes-validate:\n{text}");
}

#[test]
fn istio_resources_validate_against_the_istio_crd_schemas() {
    let Some(python) = peer("TEST_PYTHON", "python3") else {
        return;
    };
    let resources: Vec<Value> = manifests()
        .iter()
        .filter(|m| {
            m.doc["apiVersion"]
                .as_str()
                .is_some_and(|a| a.contains(".istio.io/"))
        })
        .map(|m| {
            let kind = m.doc["kind"].as_str().unwrap();
            json!({
                "name": format!("{} {kind}", m.file),
                "key": format!("{}/{kind}", m.doc["apiVersion"].as_str().unwrap()),
                "spec": m.doc["spec"],
            })
        })
        .collect();
    assert_eq!(
        resources.len(),
        4,
        "Gateway, VirtualService, AuthorizationPolicy, EnvoyFilter"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deploy/validate_istio.py");
    let mut child = Command::new(python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = Value::from(resources).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(3) {
        missing_peer(&format!("python3 with jsonschema: {}", text.trim()));
        return;
    }
    assert!(output.status.success(), "Istio schema validation:\n{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        4,
        "{text}"
    );
}

/// One YAML document from a file under deploy/ (`file` is relative to deploy/).
struct Manifest {
    file: String,
    doc: Value,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every document of every .yaml/.yml file under deploy/, parsed.
fn manifests() -> Vec<Manifest> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let file = path
            .strip_prefix(deploy_dir())
            .unwrap()
            .display()
            .to_string();
        // Prometheus rule files, not Kubernetes objects: tests/monitoring.rs checks them.
        if file.starts_with("monitoring/") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for chunk in documents(&text) {
            let doc: Value = serde_yaml_ng::from_str(chunk)
                .unwrap_or_else(|e| panic!("deploy/{file} does not parse: {e}"));
            if !doc.is_null() {
                out.push(Manifest {
                    file: file.clone(),
                    doc,
                });
            }
        }
    }
    assert!(!out.is_empty(), "no manifests under deploy/");
    out
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// The documents of a YAML stream, split at `---` lines.
fn documents(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            out.push(&text[start..at]);
            start = at + line.len();
        }
        at += line.len();
    }
    out.push(&text[start..]);
    out
}

/// The document of `kind` in deploy/`file` (a file may hold several).
fn find_kind(file: &str, kind: &str) -> Value {
    let all = manifests();
    let mut docs = all
        .into_iter()
        .filter(|m| m.file == file && m.doc["kind"] == kind);
    let doc = docs
        .next()
        .unwrap_or_else(|| panic!("deploy/{file} has no {kind}"));
    assert!(docs.next().is_none(), "deploy/{file} has several {kind}s");
    doc.doc
}

/// What `sh deploy/istio/ticket-keys.sh [previous]` prints, with `openssl` on PATH.
fn ticket_keys(openssl: &Path, previous: Option<&Path>) -> String {
    let mut command = Command::new("sh");
    command
        .arg(deploy_dir().join("istio/ticket-keys.sh"))
        .args(previous);
    let dir = openssl.parent().unwrap().as_os_str().to_owned();
    let path = std::env::join_paths(std::iter::once(PathBuf::from(dir)).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    command.env("PATH", path);
    let output = command.output().expect("run sh");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ticket-keys.sh: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

/// deploy/README.md.
fn guide() -> String {
    std::fs::read_to_string(deploy_dir().join("README.md")).unwrap()
}

/// The one document in deploy/`file`.
fn find(file: &str) -> &'static Value {
    static ALL: std::sync::OnceLock<Vec<Manifest>> = std::sync::OnceLock::new();
    let all = ALL.get_or_init(manifests);
    let mut docs = all.iter().filter(|m| m.file == file);
    let doc = docs
        .next()
        .unwrap_or_else(|| panic!("deploy/{file} missing"));
    assert!(docs.next().is_none(), "deploy/{file} has several documents");
    &doc.doc
}

/// The pod-like specs Cloud Run runs runnel with: the service's and the check job's.
fn cloud_run_pods() -> Vec<(&'static str, &'static Value)> {
    vec![
        (
            "cloudrun/service.yaml",
            &find("cloudrun/service.yaml")["spec"]["template"]["spec"],
        ),
        (
            "cloudrun/check-job.yaml",
            &find("cloudrun/check-job.yaml")["spec"]["template"]["spec"]["template"]["spec"],
        ),
    ]
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// runnel's configuration as the `runnel` container of `pod` would get it: its
/// RUNNEL_* variables, PORT from the container port (Cloud Run sets it), and each
/// *_FILE path checked to be a mounted secret item, then pointed at a real PEM file.
fn runnel_config(pod: &Value) -> Result<(Config, Warnings), String> {
    let runnel = container(pod, "runnel");
    let pki = Pki::generate().unwrap();
    let files = TempDir::new("manifest-secrets");
    let mut vars = Vec::new();
    if let Some(port) = runnel["ports"][0]["containerPort"].as_u64() {
        vars.push(("PORT".to_owned(), port.to_string()));
    }
    for entry in runnel["env"].as_array().into_iter().flatten() {
        let name = entry["name"]
            .as_str()
            .ok_or("an env entry without a name")?;
        if name == "PORT" {
            return Err("PORT: set by Cloud Run from containerPort; do not set it".into());
        }
        if !name.starts_with("RUNNEL_") {
            continue;
        }
        if !VARS.iter().any(|v| v.name == name) {
            return Err(format!("{name}: not a variable runnel knows"));
        }
        let value = entry["value"]
            .as_str()
            .ok_or_else(|| format!("{name}: value must be a string"))?;
        let value = match name.strip_suffix("_FILE") {
            Some(stem) => {
                secret_file(pod, runnel, value).map_err(|e| format!("{name}: {e}"))?;
                let pem = pem_for(stem, &pki).ok_or_else(|| format!("{name}: no test PEM"))?;
                let real = files.path().join(value.trim_start_matches('/'));
                std::fs::create_dir_all(real.parent().unwrap()).unwrap();
                std::fs::write(&real, pem).unwrap();
                // Owner-only, as a key file should be (Cloud Run mounts secrets 0444; runnel then
                // warns once at start-up, a false alarm in a one-user container).
                std::fs::set_permissions(
                    &real,
                    std::os::unix::fs::PermissionsExt::from_mode(0o400),
                )
                .unwrap();
                real.display().to_string()
            }
            None => value.to_owned(),
        };
        vars.push((name.to_owned(), value));
    }
    Config::from_vars(vars).map_err(|e| format!("{}: {}", e.var, e.reason))
}

fn pem_for(stem: &str, pki: &Pki) -> Option<String> {
    match stem {
        "RUNNEL_TLS_CA" => Some(pki.ca_cert_pem.clone()),
        "RUNNEL_TLS_CERT" => Some(pki.client.cert_pem.clone()),
        "RUNNEL_TLS_KEY" => Some(pki.client.key_pem.clone()),
        _ => None,
    }
}

/// Ok when `path` is a file that a secret volume mounted in `container` provides.
fn secret_file(pod: &Value, container: &Value, path: &str) -> Result<(), String> {
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let dir = mount["mountPath"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('/');
        let Some(file) = path.strip_prefix(dir).and_then(|f| f.strip_prefix('/')) else {
            continue;
        };
        let volume = pod["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == mount["name"]))
            .ok_or_else(|| format!("volume {} is not defined", mount["name"]))?;
        let items = volume["secret"]["items"].as_array();
        if items.into_iter().flatten().any(|i| i["path"] == file) {
            return Ok(());
        }
    }
    Err(format!(
        "{path} is not a file of a secret volume mounted in the container"
    ))
}

fn only_keys(v: &Value, allowed: &[&str], what: &str) {
    for key in v
        .as_object()
        .unwrap_or_else(|| panic!("{what} is not a map"))
        .keys()
    {
        assert!(
            allowed.contains(&key.as_str()),
            "{what}: unknown field {key}"
        );
    }
}

/// Istio host matching: exact, `*`, or a `*.suffix` wildcard.
fn host_matches(pattern: &str, host: &str) -> bool {
    pattern == "*"
        || pattern.eq_ignore_ascii_case(host)
        || pattern
            .strip_prefix('*')
            .is_some_and(|suffix| suffix.starts_with('.') && host.ends_with(suffix))
}

/// Kinds kubernetes-validate has schemas for: the core API and the *.k8s.io groups.
fn is_core_kind(doc: &Value) -> bool {
    let Some(api) = doc["apiVersion"].as_str() else {
        return false;
    };
    match api.split_once('/') {
        None => true,
        Some((group, _)) => {
            ["apps", "batch", "autoscaling", "policy"].contains(&group)
                || group.ends_with(".k8s.io")
        }
    }
}
