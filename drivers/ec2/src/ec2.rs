//! The EC2 API, through the official SDK: launches with spot-then-on-demand fallback, the
//! runner's instances by tag, termination, and the error classes that decide between backing
//! off, falling back and failing at once.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    Instance, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceStateName, LaunchTemplateSpecification, MarketType,
    ResourceType, ShutdownBehavior, SpotMarketOptions, Tag, TagSpecification, VolumeType,
};
use drover_core::{Error, Result, progress};

use crate::Ec2Settings;

/// How long throttling may hold up one call before it fails (with backoff between tries).
const THROTTLE_BUDGET: Duration = Duration::from_secs(60);

/// What an EC2 error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Too many calls: wait and try the same call again.
    Throttle,
    /// No capacity for this type, zone or market: try the next pool.
    Capacity,
    /// The settings are wrong: fail at once, naming the setting.
    Config(&'static str),
    /// Anything else.
    Other,
}

/// Classifies an EC2 error code.
pub fn classify(code: &str) -> Class {
    match code {
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "EC2ThrottledException"
        | "RequestThrottled"
        | "ServiceUnavailable"
        | "Unavailable"
        | "InternalError" => Class::Throttle,
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "MaxSpotInstanceCountExceeded"
        | "SpotMaxPriceTooLow"
        | "UnfulfillableCapacity"
        | "InsufficientFreeAddressesInSubnet" => Class::Capacity,
        code if code.starts_with("InvalidAMIID") => Class::Config("ami"),
        code if code.starts_with("InvalidSubnetID") || code == "InvalidSubnet" => {
            Class::Config("subnets")
        }
        code if code.starts_with("InvalidGroup") || code.starts_with("InvalidSecurityGroup") => {
            Class::Config("security_groups")
        }
        code if code.starts_with("InvalidLaunchTemplate") => Class::Config("launch_template"),
        "InvalidInstanceType" | "Unsupported" => Class::Config("instance_types"),
        code if code.contains("IamInstanceProfile") => Class::Config("iam_instance_profile"),
        "UnauthorizedOperation"
        | "AuthFailure"
        | "InvalidClientTokenId"
        | "OptInRequired"
        | "SignatureDoesNotMatch" => Class::Config("credentials"),
        code if code.starts_with("InvalidParameter") || code == "MissingParameter" => {
            Class::Config("the launch settings")
        }
        _ => Class::Other,
    }
}

/// An error of the SDK as the job log shows it: the code and message EC2 gave.
fn describe<E>(err: &aws_sdk_ec2::error::SdkError<E>) -> (String, String)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match err.as_service_error() {
        Some(service) => (
            service.code().unwrap_or("Unknown").to_owned(),
            service.message().unwrap_or("").to_owned(),
        ),
        None => (
            "Unreachable".to_owned(),
            aws_sdk_ec2::error::DisplayErrorContext(err).to_string(),
        ),
    }
}

/// One capacity pool of a launch: a market, an instance type, a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityPool {
    /// Spot or on-demand.
    pub spot: bool,
    /// The instance type (`None`: the launch template's).
    pub instance_type: Option<String>,
    /// The subnet (`None`: the launch template's or the default VPC's).
    pub subnet: Option<String>,
}

impl std::fmt::Display for CapacityPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} in {}",
            if self.spot { "spot" } else { "on-demand" },
            self.instance_type.as_deref().unwrap_or("(template's type)"),
            self.subnet.as_deref().unwrap_or("(default subnet)")
        )
    }
}

/// The pools to try, in order: spot ones first when the market allows spot, then on-demand.
pub fn capacity_pools(settings: &Ec2Settings) -> Vec<CapacityPool> {
    let types: Vec<Option<String>> = if settings.instance_types.is_empty() {
        vec![None]
    } else {
        settings.instance_types.iter().cloned().map(Some).collect()
    };
    let subnets: Vec<Option<String>> = if settings.subnets.is_empty() {
        vec![None]
    } else {
        settings.subnets.iter().cloned().map(Some).collect()
    };
    let markets: &[bool] = match settings.market.as_str() {
        "spot" => &[true],
        "spot-then-on-demand" => &[true, false],
        _ => &[false],
    };
    let mut pools = Vec::new();
    for spot in markets {
        for instance_type in &types {
            for subnet in &subnets {
                pools.push(CapacityPool {
                    spot: *spot,
                    instance_type: instance_type.clone(),
                    subnet: subnet.clone(),
                });
            }
        }
    }
    pools
}

/// A launched instance as the launch answer describes it.
#[derive(Debug, Clone)]
pub struct Launched {
    /// Its id.
    pub id: String,
    /// Where it went.
    pub pool: CapacityPool,
}

/// The EC2 API of one region, counting the calls it makes.
pub struct Ec2 {
    client: Client,
    calls: Cell<u32>,
}

/// An instance of the runner's, as DescribeInstances shows it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Its id.
    pub id: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Its state, e.g. `running`.
    pub state: String,
    /// Why it is in that state, when EC2 says (`Server.SpotInstanceTermination`).
    pub reason: Option<String>,
    /// The values an address template may use.
    pub addresses: BTreeMap<&'static str, String>,
}

impl Ec2 {
    /// A client from the operator's settings and the SDK's usual credential chain
    /// (environment, profile, instance role).
    pub async fn connect(settings: &Ec2Settings) -> Ec2 {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            // The driver does its own backoff on throttling, bounded by the stage: few SDK tries.
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(2));
        if let Some(region) = &settings.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some(profile) = &settings.profile {
            loader = loader.profile_name(profile);
        }
        if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
            loader = loader.credentials_provider(aws_sdk_ec2::config::Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "drover-ec2 settings",
            ));
        }
        let config = loader.load().await;
        Ec2 {
            client: Client::new(&config),
            calls: Cell::new(0),
        }
    }

    /// How many API calls this process made.
    pub fn calls(&self) -> u32 {
        self.calls.get()
    }

    fn count(&self) {
        self.calls.set(self.calls.get() + 1);
    }

    /// Launches `count` instances (at least one), trying the pools in order: a capacity error
    /// moves to the next, throttling backs off and tries again, a settings error fails at once
    /// and launches nothing. `token` makes each pool's call idempotent.
    #[allow(clippy::too_many_arguments)]
    pub async fn launch(
        &self,
        settings: &Ec2Settings,
        count: usize,
        token: &str,
        tags: &BTreeMap<String, String>,
        user_data: &str,
        dry_run: bool,
    ) -> Result<Vec<Launched>> {
        let pools = capacity_pools(settings);
        let mut failures = Vec::new();
        for (index, pool) in pools.iter().enumerate() {
            let token = format!("{token}-{index}");
            let backoff = drover_core::Backoff::default();
            let started = std::time::Instant::now();
            let mut attempt = 0;
            loop {
                self.count();
                let request =
                    self.run_instances(settings, pool, count, &token, tags, user_data, dry_run);
                let err = match request.send().await {
                    Ok(output) => {
                        let ids: Vec<Launched> = output
                            .instances()
                            .iter()
                            .filter_map(Instance::instance_id)
                            .map(|id| Launched {
                                id: id.to_owned(),
                                pool: pool.clone(),
                            })
                            .collect();
                        return Ok(ids);
                    }
                    Err(err) => err,
                };
                let (code, message) = describe(&err);
                if dry_run && code == "DryRunOperation" {
                    return Ok(Vec::new());
                }
                match classify(&code) {
                    Class::Throttle if started.elapsed() < THROTTLE_BUDGET => {
                        let pause = backoff.delay(attempt);
                        attempt += 1;
                        progress!(
                            "EC2 is throttling RunInstances ({code}); trying again in {:.1} s",
                            pause.as_secs_f64()
                        );
                        tokio::time::sleep(pause).await;
                    }
                    Class::Capacity => {
                        progress!(
                            "No capacity for {pool} ({code}: {message}); trying the next pool"
                        );
                        failures.push(format!("{pool}: {code}"));
                        break;
                    }
                    Class::Config(setting) => {
                        return Err(Error::system(format!(
                            "EC2 refused the launch because of [driver] {setting}: {code}: {message}"
                        )));
                    }
                    Class::Throttle | Class::Other => {
                        return Err(Error::transient(format!(
                            "RunInstances failed for {pool}: {code}: {message}"
                        )));
                    }
                }
            }
        }
        Err(Error::system(format!(
            "no capacity in any pool ({}); add instance types or subnets, or allow on-demand with market = \"spot-then-on-demand\"",
            failures.join("; ")
        )))
    }

    #[allow(clippy::too_many_arguments)]
    fn run_instances(
        &self,
        settings: &Ec2Settings,
        pool: &CapacityPool,
        count: usize,
        token: &str,
        tags: &BTreeMap<String, String>,
        user_data: &str,
        dry_run: bool,
    ) -> aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder {
        use base64_user_data as encode;
        let count = i32::try_from(count.max(1)).unwrap_or(i32::MAX);
        let ec2_tags: Vec<Tag> = tags
            .iter()
            .map(|(key, value)| Tag::builder().key(key).value(value).build())
            .collect();
        let tagged = |kind: ResourceType| {
            TagSpecification::builder()
                .resource_type(kind)
                .set_tags(Some(ec2_tags.clone()))
                .build()
        };
        let mut request = self
            .client
            .run_instances()
            // All or nothing per pool: a partial launch would leave the rest to guesswork.
            .min_count(count)
            .max_count(count)
            .client_token(token)
            .dry_run(dry_run)
            .user_data(encode(user_data))
            .tag_specifications(tagged(ResourceType::Instance))
            .tag_specifications(tagged(ResourceType::Volume))
            .tag_specifications(tagged(ResourceType::NetworkInterface))
            // IMDSv2 only; hop limit 2 so containers in the instance reach it too.
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .http_put_response_hop_limit(2)
                    .build(),
            );
        if !pool.spot {
            // A `poweroff` inside ends the bill, not only the boot (spot instances terminate
            // on their own terms).
            request = request.instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate);
        }
        if let Some(template) = &settings.launch_template {
            let spec = LaunchTemplateSpecification::builder()
                .set_launch_template_id(template.id.clone())
                .set_launch_template_name(template.name.clone())
                .version(
                    template
                        .version
                        .clone()
                        .unwrap_or_else(|| "$Default".into()),
                )
                .build();
            request = request.launch_template(spec);
        }
        if let Some(ami) = &settings.ami {
            request = request.image_id(ami);
        }
        if let Some(instance_type) = &pool.instance_type {
            request = request.instance_type(instance_type.as_str().into());
        }
        if let Some(subnet) = &pool.subnet {
            request = request.subnet_id(subnet);
        }
        for group in &settings.security_groups {
            request = request.security_group_ids(group);
        }
        if let Some(profile) = &settings.iam_instance_profile {
            let spec = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(profile)
            } else {
                IamInstanceProfileSpecification::builder().name(profile)
            };
            request = request.iam_instance_profile(spec.build());
        }
        if let Some(volume) = &settings.root_volume {
            let ebs = EbsBlockDevice::builder()
                .set_volume_size(volume.size_gb)
                .set_volume_type(volume.volume_type.as_deref().map(VolumeType::from))
                .set_encrypted(volume.encrypted)
                .delete_on_termination(true)
                .build();
            request = request.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(volume.device_name.clone())
                    .ebs(ebs)
                    .build(),
            );
        }
        if pool.spot {
            let mut spot = SpotMarketOptions::builder();
            if let Some(price) = &settings.max_spot_price {
                spot = spot.max_price(price);
            }
            request = request.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(spot.build())
                    .build(),
            );
        }
        request
    }

    /// The runner's instances that are not terminated (one call per page).
    pub async fn owned(&self, runner: &str, more: &[(&str, &str)]) -> Result<Vec<Seen>> {
        let mut filters = vec![
            Filter::builder()
                .name(format!("tag:{}", drover_core::naming::LABEL_RUNNER))
                .values(runner)
                .build(),
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    ["pending", "running", "stopping", "stopped"]
                        .map(String::from)
                        .to_vec(),
                ))
                .build(),
        ];
        for (key, value) in more {
            filters.push(
                Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(*value)
                    .build(),
            );
        }
        self.describe(filters, Vec::new()).await
    }

    /// One instance, whatever its state (`None` when EC2 does not know it).
    pub async fn instance(&self, id: &str) -> Result<Option<Seen>> {
        match self.describe(Vec::new(), vec![id.to_owned()]).await {
            Ok(mut seen) => Ok(seen.pop()),
            Err(err) if err.to_string().contains("InvalidInstanceID") => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn describe(&self, filters: Vec<Filter>, ids: Vec<String>) -> Result<Vec<Seen>> {
        let mut seen = Vec::new();
        let mut next: Option<String> = None;
        loop {
            self.count();
            let answer = self
                .client
                .describe_instances()
                .set_filters((!filters.is_empty()).then(|| filters.clone()))
                .set_instance_ids((!ids.is_empty()).then(|| ids.clone()))
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|err| {
                    let (code, message) = describe(&err);
                    Error::transient(format!("DescribeInstances failed: {code}: {message}"))
                })?;
            for reservation in answer.reservations() {
                seen.extend(reservation.instances().iter().map(seen_of));
            }
            match answer.next_token() {
                Some(token) if !token.is_empty() => next = Some(token.to_owned()),
                _ => return Ok(seen),
            }
        }
    }

    /// Terminates `ids`; instances EC2 no longer knows count as terminated.
    pub async fn terminate(&self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.count();
        match self
            .client
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) => {
                let (code, message) = describe(&err);
                if code == "InvalidInstanceID.NotFound" && ids.len() == 1 {
                    return Ok(());
                }
                if code == "InvalidInstanceID.NotFound" {
                    // One unknown id fails the whole call: terminate the others one by one.
                    for id in ids {
                        Box::pin(self.terminate(std::slice::from_ref(id))).await?;
                    }
                    return Ok(());
                }
                Err(Error::transient(format!(
                    "TerminateInstances failed: {code}: {message}"
                )))
            }
        }
    }

    /// Sets `tags` on instance `id`.
    pub async fn tag(&self, id: &str, tags: &BTreeMap<String, String>) -> Result<()> {
        self.count();
        self.client
            .create_tags()
            .resources(id)
            .set_tags(Some(
                tags.iter()
                    .map(|(key, value)| Tag::builder().key(key).value(value).build())
                    .collect(),
            ))
            .send()
            .await
            .map(|_| ())
            .map_err(|err| {
                let (code, message) = describe(&err);
                Error::transient(format!("CreateTags on {id} failed: {code}: {message}"))
            })
    }

    /// Checks for doctor: what the credentials can see, the AMI, the subnets, and a dry run
    /// of the launch. Each is (name, Ok(detail) or Err(fix)).
    pub async fn checks(
        &self,
        settings: &Ec2Settings,
    ) -> Vec<(String, std::result::Result<String, String>)> {
        let mut checks = Vec::new();
        let zones = self.client.describe_availability_zones().send().await;
        checks.push((
            "credentials".to_owned(),
            match zones {
                Ok(zones) => Ok(format!(
                    "EC2 answers; {} availability zones",
                    zones.availability_zones().len()
                )),
                Err(err) => {
                    let (code, message) = describe(&err);
                    Err(format!(
                        "{code}: {message} (check the region, endpoint and AWS credentials)"
                    ))
                }
            },
        ));
        if let Some(ami) = &settings.ami {
            let images = self.client.describe_images().image_ids(ami).send().await;
            checks.push((
                "ami".to_owned(),
                match images {
                    Ok(images) if !images.images().is_empty() => Ok(format!("{ami} exists")),
                    Ok(_) => Err(format!("{ami} is not an image this account can launch")),
                    Err(err) => {
                        let (code, message) = describe(&err);
                        Err(format!("{ami}: {code}: {message}"))
                    }
                },
            ));
        }
        if !settings.subnets.is_empty() {
            let subnets = self
                .client
                .describe_subnets()
                .set_subnet_ids(Some(settings.subnets.clone()))
                .send()
                .await;
            checks.push((
                "subnets".to_owned(),
                match subnets {
                    Ok(found) => Ok(found
                        .subnets()
                        .iter()
                        .map(|s| {
                            format!(
                                "{} ({})",
                                s.subnet_id().unwrap_or("?"),
                                s.availability_zone().unwrap_or("?")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")),
                    Err(err) => {
                        let (code, message) = describe(&err);
                        Err(format!("{code}: {message}"))
                    }
                },
            ));
        }
        let dry = self
            .launch(
                settings,
                1,
                "drover-doctor",
                &BTreeMap::new(),
                "#!/bin/sh\n",
                true,
            )
            .await;
        checks.push((
            "launch (dry run)".to_owned(),
            dry.map(|_| "RunInstances would succeed with these settings".to_owned())
                .map_err(|err| err.to_string()),
        ));
        checks
    }
}

fn seen_of(instance: &Instance) -> Seen {
    let tags = instance
        .tags()
        .iter()
        .filter_map(|tag| Some((tag.key()?.to_owned(), tag.value().unwrap_or("").to_owned())))
        .collect();
    let mut addresses = BTreeMap::new();
    for (name, value) in [
        ("private_ip", instance.private_ip_address()),
        ("public_ip", instance.public_ip_address()),
        ("private_dns", instance.private_dns_name()),
        ("public_dns", instance.public_dns_name()),
        ("instance_id", instance.instance_id()),
    ] {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            addresses.insert(name, value.to_owned());
        }
    }
    Seen {
        id: instance.instance_id().unwrap_or("").to_owned(),
        tags,
        state: instance
            .state()
            .and_then(|s| s.name())
            .map_or("unknown", InstanceStateName::as_str)
            .to_owned(),
        reason: instance
            .state_reason()
            .and_then(|r| r.code())
            .map(str::to_owned),
        addresses,
    }
}

/// User data is base64 on the wire.
fn base64_user_data(text: &str) -> String {
    aws_smithy_types::base64::encode(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_decide_between_backoff_fallback_and_failure() {
        assert_eq!(classify("RequestLimitExceeded"), Class::Throttle);
        assert_eq!(classify("InsufficientInstanceCapacity"), Class::Capacity);
        assert_eq!(classify("InvalidAMIID.NotFound"), Class::Config("ami"));
        assert_eq!(
            classify("InvalidSubnetID.NotFound"),
            Class::Config("subnets")
        );
        assert_eq!(
            classify("UnauthorizedOperation"),
            Class::Config("credentials")
        );
        assert_eq!(classify("Whatever"), Class::Other);
    }
}
