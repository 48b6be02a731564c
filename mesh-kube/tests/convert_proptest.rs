//! Kubernetes objects to mesh-core types: never a panic, the opt-in rule
//! applied as mesh-core states it, and the fuzz entry over any bytes.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::core::v1::{Namespace, Pod};
use mesh_core::opt_in::{self, OptInFacts};
use mesh_kube::convert::{self, Components};
use proptest::prelude::*;
use serde_json::json;

fn setting() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("enabled".to_string())),
        Just(Some("disabled".to_string())),
        "[a-zA-Z]{0,8}".prop_map(Some),
    ]
}

proptest! {
    #[test]
    fn a_pod_maps_by_the_one_opt_in_rule(
        pod_setting in setting(),
        ns_setting in setting(),
        host_network in any::<bool>(),
        own in any::<bool>(),
        ip in prop_oneof![Just("10.1.2.3".to_string()), Just("fd00::1".to_string()), "[0-9a-f:.]{0,12}"],
        node in prop_oneof![Just("n1".to_string()), Just(String::new())],
    ) {
        let mut annotations = serde_json::Map::new();
        if let Some(s) = &pod_setting {
            annotations.insert("sockmesh.io/mesh".into(), s.clone().into());
        }
        let k: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "annotations": annotations},
            "spec": {"nodeName": node, "hostNetwork": host_network, "containers": []},
            "status": {"podIPs": [{"ip": ip}]},
        })).unwrap();
        let mut ns_labels = serde_json::Map::new();
        if let Some(s) = &ns_setting {
            ns_labels.insert("sockmesh.io/mesh".into(), s.clone().into());
        }
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "ns", "labels": ns_labels}})).unwrap();
        let components = Components { own_pod: own.then(|| ("ns".into(), "p".into())), part_of: None };
        match convert::pod(&k, Some(&ns), &components) {
            Ok(p) => {
                prop_assert_eq!(p.mesh, opt_in::decide(OptInFacts {
                    pod: pod_setting.as_deref(),
                    namespace: ns_setting.as_deref(),
                    host_network,
                    mesh_component: own,
                }));
                prop_assert_eq!(p.ips[0].to_string().parse::<std::net::IpAddr>().unwrap(), ip.parse::<std::net::IpAddr>().unwrap());
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("pod ns/p: "), "{}", msg);
                prop_assert!(node.is_empty() || ip.parse::<std::net::IpAddr>().is_err(), "{}", msg);
            }
        }
    }

    #[test]
    fn the_fuzz_entry_takes_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        convert::fuzz_parse(&data);
    }

    #[test]
    fn the_fuzz_entry_takes_mangled_objects(kind in prop_oneof![Just("Pod"), Just("Service"), Just("EndpointSlice"), Just("AuthorizationPolicy")],
                                             junk in "[ -~]{0,40}", port in any::<i64>()) {
        let v = json!({
            "apiVersion": "security.sockmesh.io/v1", "kind": kind,
            "metadata": {"name": junk, "namespace": "default", "labels": {"kubernetes.io/service-name": junk}},
            "spec": {"clusterIP": junk, "ports": [{"port": port, "targetPort": junk}], "nodeName": junk,
                     "containers": [], "rules": [{"to": [{"operation": {"ports": [junk]}}]}]},
            "status": {"podIPs": [{"ip": junk}]},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [junk]}],
        });
        convert::fuzz_parse(&serde_json::to_vec(&v).unwrap());
    }
}
