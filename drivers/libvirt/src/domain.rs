//! The job's domain XML, and the little of libvirt's XML the driver reads back.
//!
//! The domain comes from a template: the built-in `domain.xml`, or the operator's
//! `domain_template`, with `@NAME@`-style placeholders that the driver fills, each value escaped.
//! Everything else in the template (machine type, extra devices, CPU model) is the operator's.
//! Only the driver's own XML and libvirt's answers are parsed here, never anything a job wrote.

use std::collections::BTreeMap;

use crate::libvirt::METADATA_NS;

/// The built-in template.
pub const BUILTIN_TEMPLATE: &str = include_str!("domain.xml");

/// The names of the guest's virtio-serial ports, in the order ctl, out, err.
pub const PORTS: [&str; 3] = ["org.drover.ctl", "org.drover.out", "org.drover.err"];

/// A disk of the job's domain.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The file on the host.
    pub path: String,
    /// `raw` or `qcow2`.
    pub format: &'static str,
    /// The guest's device, `vda`...
    pub target: &'static str,
    /// The serial the guest finds it by (`/sys/block/*/serial`), if any.
    pub serial: Option<&'static str>,
    /// Attached read-only.
    pub read_only: bool,
}

impl Disk {
    /// Its `<disk>` element, for a template or a hot-plug.
    pub fn xml(&self) -> String {
        format!(
            "<disk type='file' device='disk'><driver name='qemu' type='{}' discard='unmap'/><source file='{}'/><target dev='{}' bus='virtio'/>{}{}</disk>",
            self.format,
            escape(&self.path),
            self.target,
            self.serial
                .map(|serial| format!("<serial>{serial}</serial>"))
                .unwrap_or_default(),
            if self.read_only { "<readonly/>" } else { "" },
        )
    }
}

/// How the guest boots: its own boot loader, or a kernel given directly.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    /// The kernel, for direct kernel boot.
    pub kernel: Option<String>,
    /// Its initrd.
    pub initrd: Option<String>,
    /// Its command line.
    pub cmdline: Option<String>,
}

/// The guest's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// QEMU's user-mode networking (slirp): the guest reaches what the host reaches, and
    /// nothing reaches the guest.
    User,
    /// A libvirt network, by name.
    Libvirt(String),
    /// No network at all: the stage channel needs none.
    None,
}

impl Network {
    /// `user`, `none` or `libvirt:NAME`.
    pub fn parse(text: &str) -> Option<Network> {
        match text {
            "user" => Some(Network::User),
            "none" => Some(Network::None),
            _ => text
                .strip_prefix("libvirt:")
                .filter(|name| !name.is_empty())
                .map(|name| Network::Libvirt(name.to_owned())),
        }
    }
}

/// Everything the driver puts into a template.
#[derive(Debug, Clone)]
pub struct Spec {
    /// `kvm` or `qemu`.
    pub domain_type: String,
    /// The domain's name.
    pub name: String,
    /// drover's labels, `drover.runner` and so on.
    pub labels: BTreeMap<String, String>,
    /// Memory in KiB.
    pub memory_kib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// How it boots.
    pub boot: Boot,
    /// Its disks, the root disk first.
    pub disks: Vec<Disk>,
    /// Its network.
    pub network: Network,
    /// Where the serial console's output goes (through virtlogd, which bounds its size).
    pub console_log: String,
}

impl Spec {
    /// The domain XML: `template` with every placeholder filled.
    pub fn render(&self, template: &str) -> String {
        let boot = match &self.boot.kernel {
            Some(kernel) => {
                let mut xml = format!("<kernel>{}</kernel>", escape(kernel));
                if let Some(initrd) = &self.boot.initrd {
                    xml += &format!("<initrd>{}</initrd>", escape(initrd));
                }
                if let Some(cmdline) = &self.boot.cmdline {
                    xml += &format!("<cmdline>{}</cmdline>", escape(cmdline));
                }
                xml
            }
            None => "<boot dev='hd'/>".to_owned(),
        };
        // Under KVM the guest sees the host's CPU; under TCG QEMU's default model is the fast
        // one to emulate.
        let cpu = if self.domain_type == "kvm" {
            "<cpu mode='host-passthrough'/>"
        } else {
            ""
        };
        let disks: String = self.disks.iter().map(Disk::xml).collect();
        let interface = match &self.network {
            Network::User => "<interface type='user'><model type='virtio'/></interface>".to_owned(),
            Network::Libvirt(network) => format!(
                "<interface type='network'><source network='{}'/><model type='virtio'/></interface>",
                escape(network)
            ),
            Network::None => String::new(),
        };
        // No path: libvirt makes each socket in a directory of its own for this domain, where
        // QEMU (whatever user it runs as) may create it, and removes it with the domain.
        let channels: String = PORTS
            .iter()
            .map(|port| {
                format!(
                    "<channel type='unix'><source mode='bind'/><target type='virtio' name='{port}'/></channel>"
                )
            })
            .collect();
        let console = format!(
            "<serial type='pty'><log file='{}' append='off'/><target port='0'/></serial><console type='pty'><target type='serial' port='0'/></console>",
            escape(&self.console_log)
        );
        let metadata = labels_element(&self.labels, true);
        [
            ("@TYPE@", escape(&self.domain_type)),
            ("@NAME@", escape(&self.name)),
            ("@METADATA@", metadata),
            ("@MEMORY_KIB@", self.memory_kib.to_string()),
            ("@VCPUS@", self.vcpus.to_string()),
            ("@BOOT@", boot),
            ("@CPU@", cpu.to_owned()),
            ("@DISKS@", disks),
            ("@INTERFACE@", interface),
            ("@CHANNELS@", channels),
            ("@CONSOLE@", console),
        ]
        .iter()
        .fold(template.to_owned(), |xml, (placeholder, value)| {
            xml.replace(placeholder, value)
        })
    }
}

/// The placeholders a template must have for the driver to work.
pub const REQUIRED_PLACEHOLDERS: [&str; 5] =
    ["@NAME@", "@METADATA@", "@DISKS@", "@CHANNELS@", "@CONSOLE@"];

/// drover's metadata element holding `labels` as attributes: with its namespace for a
/// template, without it for `virDomainSetMetadata` (which is given the namespace apart).
pub fn labels_element(labels: &BTreeMap<String, String>, with_namespace: bool) -> String {
    let attributes: String = labels
        .iter()
        .map(|(key, value)| format!(" {}='{}'", attribute_name(key), escape(value)))
        .collect();
    if with_namespace {
        format!("<drover:labels xmlns:drover='{METADATA_NS}'{attributes}/>")
    } else {
        format!("<labels{attributes}/>")
    }
}

/// `drover.runner` → `runner`: the attribute of the label in drover's metadata element.
fn attribute_name(label: &str) -> &str {
    label.strip_prefix("drover.").unwrap_or(label)
}

/// Text for XML: the five special characters escaped, control characters (which XML 1.0 and
/// libvirt's C strings refuse) dropped.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '\'' => escaped.push_str("&apos;"),
            '"' => escaped.push_str("&quot;"),
            c if c.is_control() && c != '\t' && c != '\n' => {}
            c => escaped.push(c),
        }
    }
    escaped
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// The attributes of the first tag in `xml` (libvirt quotes with `"` or `'`).
fn attributes(tag: &str) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let end = tag.find('>').unwrap_or(tag.len());
    let mut rest = &tag[..end];
    // Skip `<name`.
    rest = rest.trim_start_matches('<');
    rest = rest.trim_start_matches(|c: char| !c.is_whitespace() && c != '/');
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim();
        let value = rest[eq + 1..].trim_start();
        let Some(quote) = value.chars().next().filter(|q| *q == '"' || *q == '\'') else {
            break;
        };
        let Some(close) = value[1..].find(quote) else {
            break;
        };
        found.insert(key.to_owned(), unescape(&value[1..=close]));
        rest = &value[close + 2..];
    }
    found
}

/// The drover labels in the metadata element libvirt gives back for [`METADATA_NS`]
/// (`drover.runner` and so on); empty when it is not drover's.
pub fn labels_of(metadata: &str) -> BTreeMap<String, String> {
    attributes(metadata.trim_start())
        .into_iter()
        .filter(|(key, _)| !key.starts_with("xmlns"))
        .map(|(key, value)| (format!("drover.{key}"), value))
        .collect()
}

/// The text of the first `<name>...</name>` element in `xml`.
pub fn element_text(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(unescape(&xml[start..end]))
}

/// The host sockets of the guest's drover ports (ctl, out, err) in a running domain's XML.
pub fn channel_sockets(xml: &str) -> Option<[String; 3]> {
    let mut found: [Option<String>; 3] = Default::default();
    for channel in xml.split("<channel ").skip(1) {
        let channel = channel.split("</channel>").next().unwrap_or_default();
        let tag = |name: &str| {
            channel
                .find(&format!("<{name} "))
                .map(|at| attributes(&channel[at..]))
                .unwrap_or_default()
        };
        let (source, target) = (tag("source"), tag("target"));
        let Some(index) = target
            .get("name")
            .and_then(|name| PORTS.iter().position(|port| port == name))
        else {
            continue;
        };
        found[index] = source.get("path").cloned();
    }
    let [ctl, out, err] = found;
    Some([ctl?, out?, err?])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            domain_type: "qemu".into(),
            name: "drover-ci-p1-j2".into(),
            labels: BTreeMap::from([
                ("drover.runner".into(), "ci".into()),
                ("drover.job".into(), "2".into()),
            ]),
            memory_kib: 524_288,
            vcpus: 2,
            boot: Boot {
                kernel: Some("/boot/vmlinuz".into()),
                initrd: None,
                cmdline: Some("console=ttyS0 root=/dev/vda rw".into()),
            },
            disks: vec![Disk {
                path: "/v/a'b<c.qcow2".into(),
                format: "qcow2",
                target: "vda",
                serial: None,
                read_only: false,
            }],
            network: Network::User,
            console_log: "/s/console.log".into(),
        }
    }

    #[test]
    fn the_builtin_template_is_filled_and_values_are_escaped() {
        let xml = spec().render(BUILTIN_TEMPLATE);
        assert!(!xml.contains('@'), "{xml}");
        assert!(xml.contains("<name>drover-ci-p1-j2</name>"));
        assert!(xml.contains("file='/v/a&apos;b&lt;c.qcow2'"), "{xml}");
        assert!(xml.contains("runner='ci'"));
        assert!(xml.contains("<interface type='user'>"));
        assert!(xml.contains("<kernel>/boot/vmlinuz</kernel>"));
        for placeholder in REQUIRED_PLACEHOLDERS {
            assert!(BUILTIN_TEMPLATE.contains(placeholder));
        }
    }

    #[test]
    fn labels_come_back_from_libvirts_metadata_in_either_quoting() {
        let doubled = r#"<drover:labels xmlns:drover="https://drover.dev/libvirt/1" job="2" runner="c&amp;i"/>"#;
        let labels = labels_of(doubled);
        assert_eq!(labels["drover.runner"], "c&i");
        assert_eq!(labels["drover.job"], "2");
        assert_eq!(labels.len(), 2);
        assert_eq!(labels_of("<drover:labels job='7'/>")["drover.job"], "7");
        assert!(labels_of("").is_empty());
    }

    #[test]
    fn the_channel_sockets_and_disks_are_read_from_the_live_xml() {
        let xml = r#"<domain><devices>
          <disk type="file" device="disk"><driver name="qemu" type="qcow2"/><source file="/v/o.qcow2" index="2"/><target dev="vda" bus="virtio"/></disk>
          <channel type="unix"><source mode="bind" path="/run/c/org.drover.ctl"/><target type="virtio" name="org.drover.ctl" state="connected"/></channel>
          <channel type="unix"><source mode="bind" path="/run/c/org.drover.err"/><target type="virtio" name="org.drover.err"/></channel>
          <channel type="unix"><source mode="bind" path="/run/c/org.drover.out"/><target type="virtio" name="org.drover.out"/></channel>
        </devices></domain>"#;
        assert_eq!(
            channel_sockets(xml),
            Some([
                "/run/c/org.drover.ctl".to_owned(),
                "/run/c/org.drover.out".to_owned(),
                "/run/c/org.drover.err".to_owned()
            ])
        );
        assert_eq!(channel_sockets("<domain/>"), None);
    }

    #[test]
    fn networks_are_user_none_or_a_libvirt_network() {
        assert_eq!(Network::parse("user"), Some(Network::User));
        assert_eq!(Network::parse("none"), Some(Network::None));
        assert_eq!(
            Network::parse("libvirt:ci"),
            Some(Network::Libvirt("ci".into()))
        );
        assert_eq!(Network::parse("libvirt:"), None);
        assert_eq!(Network::parse("bridge"), None);
    }
}
