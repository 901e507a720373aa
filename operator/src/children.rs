//! The objects a `FlashSale` owns, built from its spec: the data plane's
//! ConfigMap, the gateway Deployment + Service, the consumer Deployment and a
//! PodDisruptionBudget for each. Pure functions: the reconciler applies them.
//!
//! The Deployments never carry `replicas`: the autoscaler owns that field
//! through the `scale` subresource, under its own field manager.

use std::collections::BTreeMap;

use dataplane::durability::Durability;
use dataplane::redis_conn::RedisMode;
use dataplane::spec::{DocumentMetadata, SaleDocument, SaleSpec};
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, LocalObjectReference, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::resource::{FlashSale, SecretKeyRef};

/// The one field manager the reconciler applies with.
pub const MANAGER: &str = "flashsale-operator";
/// Where the sale's config is mounted in data plane pods.
pub const CONFIG_DIR: &str = "/etc/flashsale";
pub const CONFIG_KEY: &str = "sale.yaml";
/// Pod-template annotation that rolls the pods when the sale's products
/// change: a product's stream, keys and order rows need a process that knows
/// them. Every other sale setting reaches running pods live (the operator
/// publishes the applied spec in Redis, `dataplane::live`), so a stock, end
/// time or limit edit mid-sale restarts nothing.
pub const PRODUCTS_ANNOTATION: &str = "flashsale.dev/products-checksum";
pub const HTTP_PORT: i32 = 8080;
pub const ADMIN_PORT: i32 = 9090;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("FlashSale has no {0}")]
    Missing(&'static str),
    #[error("serialize the sale config: {0}")]
    Config(#[from] serde_yaml::Error),
}

/// Which of the two data plane workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Gateway,
    Consumer,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gateway => "gateway",
            Self::Consumer => "consumer",
        }
    }
}

/// Object names for a sale; every child is named after it.
pub fn config_map_name(sale: &str) -> String {
    format!("{sale}-dataplane")
}

pub fn workload_name(sale: &str, component: Component) -> String {
    format!("{sale}-{}", component.as_str())
}

/// Everything the reconciler applies for one sale, in apply order.
#[derive(Clone, Debug)]
pub struct Children {
    pub config_map: ConfigMap,
    pub gateway: Deployment,
    pub gateway_service: Service,
    pub gateway_pdb: PodDisruptionBudget,
    pub consumer: Deployment,
    pub consumer_pdb: PodDisruptionBudget,
}

/// What every data-plane pod gets from the operator's own settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodDefaults {
    /// The image for gateways and consumers when a sale names none.
    pub image: String,
    /// Secrets, in each sale's namespace, the kubelet pulls the images with
    /// (a private registry); none named, the pods name none.
    pub image_pull_secrets: Vec<String>,
}

/// Builds the children of `sale`, whose data plane runs on `sale_spec` (the
/// spec in force: the sale's own, or the one applied before when the running
/// sale refused an edit); `defaults` fill in what the spec does not name.
pub fn build(
    sale: &FlashSale,
    sale_spec: &SaleSpec,
    defaults: &PodDefaults,
) -> Result<Children, BuildError> {
    let default_image = defaults.image.as_str();
    let name = sale
        .metadata
        .name
        .clone()
        .ok_or(BuildError::Missing("name"))?;
    let namespace = sale.namespace().ok_or(BuildError::Missing("namespace"))?;
    let owner = sale
        .controller_owner_ref(&())
        .ok_or(BuildError::Missing("uid"))?;
    let owned = Owned {
        sale: name.clone(),
        namespace: namespace.clone(),
        owner,
    };

    let document = SaleDocument {
        metadata: DocumentMetadata {
            name: name.clone(),
            namespace: namespace.clone(),
        },
        spec: sale_spec.clone(),
    };
    let config = serde_yaml::to_string(&document)?;
    let skus: Vec<&str> = sale_spec.products.iter().map(|p| p.sku.as_str()).collect();
    let checksum = format!("{:x}", Sha256::digest(skus.join(",").as_bytes()));

    let config_map = ConfigMap {
        metadata: owned.meta(config_map_name(&name), None),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_string(), config)])),
        ..Default::default()
    };

    let spec = &sale.spec;
    let mut gateway_env = vec![
        secret_env("REDIS_URL", &spec.redis.url_secret_ref),
        secret_env("TOKEN_SECRET", &spec.token_secret_ref),
        pod_name_env(),
    ];
    // Payment callbacks are verified with the provider's key and decided in
    // PostgreSQL, so only a sale that names a key gives gateways the database.
    if let Some(key) = &spec.payment_key_secret_ref {
        gateway_env.push(secret_env("PAYMENT_PUBLIC_KEY", key));
        gateway_env.push(secret_env("DATABASE_URL", &spec.database.url_secret_ref));
    }
    // Named only when set, so existing pods' templates stay as they are.
    if let Some(currency) = &spec.payment_currency {
        gateway_env.push(value_env("PAYMENT_CURRENCY", currency));
    }
    if let Some(header) = &spec.gateway.client_ip_header {
        gateway_env.push(value_env("CLIENT_IP_HEADER", header));
    }
    let mut consumer_env = vec![
        secret_env("REDIS_URL", &spec.redis.url_secret_ref),
        secret_env("DATABASE_URL", &spec.database.url_secret_ref),
        pod_name_env(),
    ];
    // Standalone is what the binaries assume without it; naming only the
    // other mode keeps existing pods' templates (no roll on upgrade).
    if spec.redis.mode != RedisMode::Standalone {
        let mode = value_env("REDIS_MODE", spec.redis.mode.as_str());
        gateway_env.push(mode.clone());
        consumer_env.push(mode);
    }
    // Only a choice the mode's default would not make is named (existing
    // pods' templates stay as they are).
    if let Some(d) = spec.redis.durability
        && d != Durability::default_for(spec.redis.mode)
    {
        let durability = value_env("REDIS_DURABILITY", d.as_str());
        gateway_env.push(durability.clone());
        consumer_env.push(durability);
    }
    let gateway = owned.deployment(Workload {
        component: Component::Gateway,
        image: spec.gateway.image.as_deref().unwrap_or(default_image),
        env: gateway_env,
        http_port: true,
        resources: spec
            .gateway
            .resources
            .clone()
            .unwrap_or_else(|| default_resources("500m", "256Mi", "1Gi")),
        checksum: &checksum,
        // Gateways drain their WebSockets and in-flight purchases on SIGTERM.
        grace_seconds: 30,
        pull_secrets: &defaults.image_pull_secrets,
    });
    let consumer = owned.deployment(Workload {
        component: Component::Consumer,
        image: spec.consumer.image.as_deref().unwrap_or(default_image),
        env: consumer_env,
        http_port: false,
        resources: spec
            .consumer
            .resources
            .clone()
            .unwrap_or_else(|| default_resources("250m", "128Mi", "512Mi")),
        checksum: &checksum,
        // A consumer finishes and acknowledges its current batch before exiting.
        grace_seconds: 60,
        pull_secrets: &defaults.image_pull_secrets,
    });

    let gateway_service = Service {
        metadata: owned.meta(
            workload_name(&name, Component::Gateway),
            Some(Component::Gateway),
        ),
        spec: Some(ServiceSpec {
            selector: Some(owned.selector(Component::Gateway)),
            ports: Some(vec![
                service_port("http", HTTP_PORT),
                service_port("admin", ADMIN_PORT),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };

    Ok(Children {
        config_map,
        gateway_pdb: owned.pdb(Component::Gateway),
        consumer_pdb: owned.pdb(Component::Consumer),
        gateway,
        gateway_service,
        consumer,
    })
}

/// The labels every child carries; the selector is the instance + component subset.
pub fn labels(sale: &str, component: Option<Component>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "flashsale".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), sale.to_string()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
    ]);
    if let Some(c) = component {
        labels.insert(
            "app.kubernetes.io/component".to_string(),
            c.as_str().to_string(),
        );
    }
    labels
}

struct Owned {
    sale: String,
    namespace: String,
    owner: OwnerReference,
}

struct Workload<'a> {
    component: Component,
    image: &'a str,
    env: Vec<EnvVar>,
    http_port: bool,
    resources: ResourceRequirements,
    checksum: &'a str,
    grace_seconds: i64,
    pull_secrets: &'a [String],
}

impl Owned {
    fn meta(&self, name: String, component: Option<Component>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.sale, component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    fn selector(&self, component: Component) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/instance".to_string(), self.sale.clone()),
            (
                "app.kubernetes.io/component".to_string(),
                component.as_str().to_string(),
            ),
        ])
    }

    fn deployment(&self, w: Workload<'_>) -> Deployment {
        let name = workload_name(&self.sale, w.component);
        let mut ports = vec![container_port("admin", ADMIN_PORT)];
        if w.http_port {
            ports.insert(0, container_port("http", HTTP_PORT));
        }
        let container = Container {
            name: w.component.as_str().to_string(),
            image: Some(w.image.to_string()),
            args: Some(vec![
                w.component.as_str().to_string(),
                "--config".to_string(),
                format!("{CONFIG_DIR}/{CONFIG_KEY}"),
            ]),
            env: Some(w.env),
            ports: Some(ports),
            liveness_probe: Some(admin_probe("/healthz", 3)),
            readiness_probe: Some(admin_probe("/readyz", 1)),
            resources: Some(w.resources),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".to_string()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volume_mounts: Some(vec![VolumeMount {
                name: "sale".to_string(),
                mount_path: CONFIG_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let mut pod_labels = labels(&self.sale, Some(w.component));
        pod_labels.remove("app.kubernetes.io/managed-by");
        Deployment {
            metadata: self.meta(name, Some(w.component)),
            spec: Some(DeploymentSpec {
                // `replicas` deliberately absent: the autoscaler owns it.
                selector: LabelSelector {
                    match_labels: Some(self.selector(w.component)),
                    ..Default::default()
                },
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".to_string()),
                    // Never drop below the current capacity while rolling.
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::String("25%".to_string())),
                        max_unavailable: Some(IntOrString::Int(0)),
                    }),
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels),
                        annotations: Some(BTreeMap::from([(
                            PRODUCTS_ANNOTATION.to_string(),
                            w.checksum.to_string(),
                        )])),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        // The data plane never talks to the Kubernetes API.
                        automount_service_account_token: Some(false),
                        termination_grace_period_seconds: Some(w.grace_seconds),
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(65532),
                            run_as_group: Some(65532),
                            seccomp_profile: Some(SeccompProfile {
                                type_: "RuntimeDefault".to_string(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        // Named only when set: pods of an operator without
                        // them keep their templates (no roll on upgrade).
                        image_pull_secrets: (!w.pull_secrets.is_empty()).then(|| {
                            w.pull_secrets
                                .iter()
                                .map(|name| LocalObjectReference { name: name.clone() })
                                .collect()
                        }),
                        volumes: Some(vec![Volume {
                            name: "sale".to_string(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: config_map_name(&self.sale),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }]),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pdb(&self, component: Component) -> PodDisruptionBudget {
        PodDisruptionBudget {
            metadata: self.meta(workload_name(&self.sale, component), Some(component)),
            spec: Some(PodDisruptionBudgetSpec {
                // Drains proceed one pod at a time, whatever the replica count.
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(self.selector(component)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

fn secret_env(name: &str, secret: &SecretKeyRef) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.name.clone(),
                key: secret.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn value_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.to_string()),
        ..Default::default()
    }
}

fn pod_name_env() -> EnvVar {
    EnvVar {
        name: "POD_NAME".to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

fn service_port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }
}

fn admin_probe(path: &str, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("admin".to_string()),
            ..Default::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

fn default_resources(cpu: &str, memory: &str, memory_limit: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.to_string())),
            ("memory".to_string(), Quantity(memory.to_string())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity(memory_limit.to_string()),
        )])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn img() -> PodDefaults {
        PodDefaults {
            image: "img:1".into(),
            image_pull_secrets: Vec::new(),
        }
    }

    #[test]
    fn pull_secrets_are_named_only_when_set() -> anyhow::Result<()> {
        let sale = fixtures::sale();
        let plain = build(&sale, &sale.spec.sale, &img())?;
        for d in [&plain.gateway, &plain.consumer] {
            let json = serde_json::to_value(d)?;
            assert!(
                json["spec"]["template"]["spec"]
                    .get("imagePullSecrets")
                    .is_none(),
                "{json}"
            );
        }
        let private = PodDefaults {
            image_pull_secrets: vec!["registry".into(), "mirror".into()],
            ..img()
        };
        let built = build(&sale, &sale.spec.sale, &private)?;
        for d in [&built.gateway, &built.consumer] {
            let json = serde_json::to_value(d)?;
            assert_eq!(
                json["spec"]["template"]["spec"]["imagePullSecrets"],
                serde_json::json!([{"name": "registry"}, {"name": "mirror"}])
            );
        }
        Ok(())
    }

    #[test]
    fn deployments_leave_replicas_to_the_autoscaler() -> anyhow::Result<()> {
        let children = {
            let sale = fixtures::sale();
            build(&sale, &sale.spec.sale, &img())
        }?;
        for d in [&children.gateway, &children.consumer] {
            let json = serde_json::to_value(d)?;
            assert!(json["spec"].get("replicas").is_none(), "{json}");
            assert_eq!(
                json["metadata"]["ownerReferences"][0]["controller"],
                serde_json::json!(true)
            );
        }
        Ok(())
    }

    #[test]
    fn a_payment_key_gives_gateways_the_key_and_the_database() -> anyhow::Result<()> {
        let env_names = |sale: &FlashSale| -> anyhow::Result<Vec<String>> {
            let gateway = build(sale, &sale.spec.sale, &img())?.gateway;
            let containers = gateway
                .spec
                .and_then(|s| s.template.spec)
                .map(|p| p.containers)
                .unwrap_or_default();
            Ok(containers
                .iter()
                .flat_map(|c| c.env.iter().flatten())
                .map(|e| e.name.clone())
                .collect())
        };
        let mut sale = fixtures::sale();
        assert_eq!(env_names(&sale)?, ["REDIS_URL", "TOKEN_SECRET", "POD_NAME"]);
        sale.spec.payment_key_secret_ref = Some(SecretKeyRef {
            name: "payment-provider".into(),
            key: "public-key".into(),
        });
        let with_payments = [
            "REDIS_URL",
            "TOKEN_SECRET",
            "POD_NAME",
            "PAYMENT_PUBLIC_KEY",
            "DATABASE_URL",
        ];
        assert_eq!(env_names(&sale)?, with_payments);
        sale.spec.redis.mode = RedisMode::Cluster;
        assert_eq!(
            env_names(&sale)?,
            [&with_payments[..], &["REDIS_MODE"]].concat()
        );
        // `local` on a cluster is not the mode's default: named.
        sale.spec.redis.durability = Some(Durability::Local);
        assert_eq!(
            env_names(&sale)?,
            [&with_payments[..], &["REDIS_MODE", "REDIS_DURABILITY"]].concat()
        );
        Ok(())
    }

    #[test]
    fn a_currency_and_a_client_ip_header_reach_the_gateways() -> anyhow::Result<()> {
        let env = |sale: &FlashSale| -> anyhow::Result<Vec<(String, Option<String>)>> {
            let gateway = build(sale, &sale.spec.sale, &img())?.gateway;
            Ok(gateway
                .spec
                .and_then(|s| s.template.spec)
                .map(|p| p.containers)
                .unwrap_or_default()
                .iter()
                .flat_map(|c| c.env.iter().flatten())
                .map(|e| (e.name.clone(), e.value.clone()))
                .collect())
        };
        let mut sale = fixtures::sale();
        let before = env(&sale)?;
        sale.spec.payment_currency = Some("EUR".into());
        sale.spec.gateway.client_ip_header = Some("x-forwarded-for".into());
        let after = env(&sale)?;
        assert_eq!(after[..before.len()], before[..]);
        assert_eq!(
            after[before.len()..],
            [
                ("PAYMENT_CURRENCY".to_string(), Some("EUR".to_string())),
                (
                    "CLIENT_IP_HEADER".to_string(),
                    Some("x-forwarded-for".to_string())
                ),
            ]
        );
        Ok(())
    }

    #[test]
    fn config_map_holds_the_dataplane_document() -> anyhow::Result<()> {
        let sale = fixtures::sale();
        let children = build(&sale, &sale.spec.sale, &img())?;
        let data = children.config_map.data.unwrap_or_default();
        let doc = SaleDocument::parse(&data[CONFIG_KEY], "configmap")?;
        assert_eq!(
            doc.id(),
            dataplane::spec::SaleId::new("shop", "singles-day")
        );
        assert_eq!(doc.spec, sale.spec.sale);
        Ok(())
    }

    /// The pod template for `sale`, as the reconciler would apply it.
    fn template(sale: &FlashSale) -> anyhow::Result<serde_json::Value> {
        let d = build(sale, &sale.spec.sale, &img())?.gateway;
        Ok(serde_json::to_value(d.spec.map(|s| s.template))?)
    }

    #[test]
    fn only_a_product_list_change_rolls_the_pods() -> anyhow::Result<()> {
        let mut sale = fixtures::sale();
        let before = template(&sale)?;
        assert!(before["metadata"]["annotations"][PRODUCTS_ANNOTATION].is_string());
        // Live settings: stock, price, limits, window, rate limits, payment,
        // purchase tickets.
        sale.spec.sale.products[0].stock += 100;
        sale.spec.sale.products[0].per_user_limit += 1;
        sale.spec.sale.products[0].price = "6000.00".parse()?;
        sale.spec.sale.end_time += jiff::SignedDuration::from_hours(1);
        sale.spec.sale.payment.timeout_seconds += 60;
        sale.spec.sale.purchase_ticket.enabled = true;
        sale.spec.sale.purchase_ticket.ttl_seconds = 30;
        sale.spec.sale.rate_limits.per_user = Some(dataplane::spec::RateLimit {
            requests_per_second: 9,
            burst: 9,
        });
        assert_eq!(
            before,
            template(&sale)?,
            "a live setting changed the pod template"
        );
        // A new product needs processes that know its stream.
        let mut added = sale.spec.sale.products[0].clone();
        added.sku = "new-sku".into();
        sale.spec.sale.products.push(added);
        assert_ne!(before, template(&sale)?);
        Ok(())
    }
}
