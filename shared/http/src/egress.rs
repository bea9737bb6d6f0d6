//! Egress policy: where an outbound request may go.
//!
//! Guarantee: under a policy with `allow_private == false`, no connection made by
//! [`crate::ReqwestSender`] reaches a loopback, private, link-local, CGNAT, multicast, broadcast,
//! reserved or cloud-metadata address. IP-literal hosts are checked before anything is sent; host
//! names are checked inside the client's DNS resolver ([`EgressResolver`]), which is the only
//! place the client learns addresses from, so the check holds for the address actually connected
//! (no DNS-rebinding window between a check and the connect). Under a policy with
//! `allow_http == false`, only `https` URLs are accepted.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Where outbound requests may go. The default is [`EgressPolicy::strict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Allow plain `http://` URLs (otherwise only `https://`).
    pub allow_http: bool,
    /// Allow non-public addresses: loopback, private, link-local, metadata, ...
    pub allow_private: bool,
}

impl EgressPolicy {
    /// `https` only, public addresses only: the production policy.
    pub const fn strict() -> Self {
        Self {
            allow_http: false,
            allow_private: false,
        }
    }

    /// Plain `http` and private addresses allowed: for tests against a local server only.
    pub const fn permissive_for_tests() -> Self {
        Self {
            allow_http: true,
            allow_private: true,
        }
    }

    /// Checks a URL's scheme and, when its host is an IP literal, that address. Host names are
    /// checked at resolution time by [`EgressResolver`].
    pub fn check_url(&self, url: &Url) -> Result<(), EgressRefused> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            "http" => {
                return Err(EgressRefused(
                    "scheme http is not allowed (https only)".to_owned(),
                ));
            }
            other => {
                return Err(EgressRefused(format!("scheme {other:?} is not allowed")));
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EgressRefused(
                "credentials in the URL are not allowed".to_owned(),
            ));
        }
        let ip = match url.host() {
            None => return Err(EgressRefused("URL has no host".to_owned())),
            Some(Host::Domain(_)) => return Ok(()),
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        };
        self.check_ip(ip)
    }

    /// Checks one address against the policy.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), EgressRefused> {
        if self.allow_private {
            return Ok(());
        }
        match non_public_reason(ip) {
            None => Ok(()),
            Some(reason) => Err(EgressRefused(format!(
                "address {ip} is {reason}, not a public address"
            ))),
        }
    }

    /// Checks every address a host name resolved to: one refused address refuses the host.
    pub fn check_resolved(&self, host: &str, addrs: &[SocketAddr]) -> Result<(), EgressRefused> {
        if addrs.is_empty() {
            return Err(EgressRefused(format!(
                "host {host:?} resolved to no address"
            )));
        }
        for addr in addrs {
            self.check_ip(addr.ip())
                .map_err(|e| EgressRefused(format!("host {host:?} resolved to {}", e.0)))?;
        }
        Ok(())
    }
}

impl Default for EgressPolicy {
    fn default() -> Self {
        Self::strict()
    }
}

/// Why the egress policy refused a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressRefused(pub String);

impl fmt::Display for EgressRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused by egress policy: {}", self.0)
    }
}

impl std::error::Error for EgressRefused {}

/// Why an address is not a public destination, or `None` when it is one.
///
/// Covers loopback, unspecified, "this network", private (RFC 1918, fc00::/7), CGNAT
/// (100.64/10), link-local (169.254/16, fe80::/10), the cloud metadata addresses
/// (169.254.169.254, fd00:ec2::254), multicast, broadcast, reserved and documentation ranges, and
/// IPv6 forms embedding an IPv4 address (mapped, compatible, NAT64, 6to4), which are classified by
/// the embedded address.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        return Some("the cloud metadata address");
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_broadcast() {
        return Some("broadcast");
    }
    let reason = match o {
        [0, ..] => "in \"this network\" (0.0.0.0/8)",
        [127, ..] => "loopback",
        [10, ..] => "private (10.0.0.0/8)",
        [172, b, ..] if (16..=31).contains(&b) => "private (172.16.0.0/12)",
        [192, 168, ..] => "private (192.168.0.0/16)",
        [169, 254, ..] => "link-local (169.254.0.0/16)",
        [100, b, ..] if (64..=127).contains(&b) => "shared CGNAT space (100.64.0.0/10)",
        [192, 0, 0, _] => "reserved for IETF protocol assignments (192.0.0.0/24)",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "documentation (TEST-NET)",
        [198, b, ..] if b == 18 || b == 19 => "benchmarking (198.18.0.0/15)",
        [a, ..] if (224..=239).contains(&a) => "multicast (224.0.0.0/4)",
        [a, ..] if a >= 240 => "reserved (240.0.0.0/4)",
        _ => return None,
    };
    Some(reason)
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
        return Some("the cloud metadata address");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_reason(v4).map(|_| "an IPv4-mapped non-public address");
    }
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let reason = match s {
        // ::a.b.c.d, deprecated IPv4-compatible addresses.
        [0, 0, 0, 0, 0, 0, _, _] => "an IPv4-compatible (deprecated) address",
        // 64:ff9b::/96, the NAT64 well-known prefix: classified by the embedded address.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
            return v4_reason(embedded(hi, lo)).map(|_| "NAT64 of a non-public address");
        }
        [0x64, 0xff9b, 1, ..] => "local-use NAT64 (64:ff9b:1::/48)",
        // 2002::/16, 6to4: classified by the embedded address.
        [0x2002, hi, lo, ..] => {
            return v4_reason(embedded(hi, lo)).map(|_| "6to4 of a non-public address");
        }
        [0x2001, 0, ..] => "Teredo (2001::/32)",
        [0x2001, 0xdb8, ..] => "documentation (2001:db8::/32)",
        [0x100, 0, 0, 0, ..] => "discard-only (100::/64)",
        [a, ..] if a & 0xfe00 == 0xfc00 => "unique local / private (fc00::/7)",
        [a, ..] if a & 0xffc0 == 0xfe80 => "link-local (fe80::/10)",
        [a, ..] if a & 0xffc0 == 0xfec0 => "site-local (fec0::/10)",
        [a, ..] if a & 0xff00 == 0xff00 => "multicast (ff00::/8)",
        _ => return None,
    };
    Some(reason)
}

/// The client's DNS resolver: resolves a host name and applies the egress policy to every
/// address in the same step, returning only checked addresses for the client to connect to.
#[derive(Clone, Copy, Debug)]
pub struct EgressResolver {
    policy: EgressPolicy,
}

impl EgressResolver {
    pub fn new(policy: EgressPolicy) -> Self {
        Self { policy }
    }
}

impl Resolve for EgressResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            policy.check_resolved(&host, &addrs)?;
            let addrs: Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Finds an egress refusal in an error's source chain (the resolver's refusal reaches the caller
/// wrapped in the client's connect error).
pub(crate) fn find_refusal<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a EgressRefused> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    // Bounded: error chains are short; stop after 32 links regardless.
    for _ in 0..32 {
        let e = current?;
        if let Some(refused) = e.downcast_ref::<EgressRefused>() {
            return Some(refused);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }

    #[test]
    fn refuses_non_public_ipv4() {
        for (ip, expect) in [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "this network"),
            ("10.0.0.1", "private"),
            ("10.255.255.255", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("169.254.0.1", "link-local"),
            ("169.254.169.254", "metadata"),
            ("100.64.0.1", "CGNAT"),
            ("100.127.255.255", "CGNAT"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.255", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("240.0.0.1", "reserved"),
            ("192.0.0.8", "IETF"),
            ("192.0.2.1", "documentation"),
            ("198.18.0.1", "benchmarking"),
        ] {
            let reason = non_public_reason(v4(ip)).unwrap_or_else(|| panic!("{ip} allowed"));
            assert!(reason.contains(expect), "{ip}: {reason}");
        }
    }

    #[test]
    fn allows_public_ipv4_including_range_edges() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "11.0.0.0",
            "9.255.255.255",
            "223.255.255.255",
            "126.255.255.255",
            "128.0.0.0",
        ] {
            assert_eq!(non_public_reason(v4(ip)), None, "{ip}");
        }
    }

    #[test]
    fn refuses_non_public_ipv6() {
        for (ip, expect) in [
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("fc00::1", "private"),
            ("fdff:ffff::1", "private"),
            ("fd00:ec2::254", "metadata"),
            ("ff02::1", "multicast"),
            ("fec0::1", "site-local"),
            ("::ffff:127.0.0.1", "IPv4-mapped"),
            ("::ffff:169.254.169.254", "IPv4-mapped"),
            ("::ffff:10.1.2.3", "IPv4-mapped"),
            ("::127.0.0.1", "IPv4-compatible"),
            ("64:ff9b::a00:1", "NAT64"),
            ("64:ff9b:1::1", "NAT64"),
            ("2002:7f00:1::", "6to4"),
            ("2002:a9fe:a9fe::1", "6to4"),
            ("2001:db8::1", "documentation"),
            ("2001:0:4136:e378::1", "Teredo"),
        ] {
            let reason = non_public_reason(v6(ip)).unwrap_or_else(|| panic!("{ip} allowed"));
            assert!(reason.contains(expect), "{ip}: {reason}");
        }
    }

    #[test]
    fn allows_public_ipv6() {
        for ip in [
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "fe00::1",
            "fbff::1",
        ] {
            assert_eq!(non_public_reason(v6(ip)), None, "{ip}");
        }
    }

    #[test]
    fn policy_checks_scheme_and_literal_hosts() {
        let strict = EgressPolicy::strict();
        let url = |s: &str| Url::parse(s).unwrap();
        assert!(strict.check_url(&url("https://example.com/x")).is_ok());
        assert!(strict.check_url(&url("https://93.184.216.34/")).is_ok());
        let e = strict.check_url(&url("http://example.com/")).unwrap_err();
        assert!(e.to_string().contains("scheme http"), "{e}");
        assert!(strict.check_url(&url("ftp://example.com/")).is_err());
        assert!(strict.check_url(&url("https://u:p@example.com/")).is_err());
        for refused in [
            "https://127.0.0.1/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::1]/",
            "https://[fd00:ec2::254]/",
            "https://[::ffff:7f00:1]/",
            // Alternative IPv4 spellings are normalized by the URL parser.
            "https://2130706433/",
            "https://0x7f.1/",
            "https://127.1/",
        ] {
            assert!(strict.check_url(&url(refused)).is_err(), "{refused}");
        }
        let permissive = EgressPolicy::permissive_for_tests();
        assert!(permissive.check_url(&url("http://127.0.0.1:8080/")).is_ok());
        let http_only = EgressPolicy {
            allow_http: true,
            allow_private: false,
        };
        assert!(http_only.check_url(&url("http://example.com/")).is_ok());
        assert!(http_only.check_url(&url("http://10.0.0.1/")).is_err());
    }

    #[test]
    fn one_refused_resolved_address_refuses_the_host() {
        let strict = EgressPolicy::strict();
        let public: SocketAddr = "93.184.216.34:0".parse().unwrap();
        let private: SocketAddr = "10.0.0.1:0".parse().unwrap();
        assert!(strict.check_resolved("h", &[public]).is_ok());
        assert!(strict.check_resolved("h", &[public, private]).is_err());
        assert!(strict.check_resolved("h", &[]).is_err());
        assert!(
            EgressPolicy::permissive_for_tests()
                .check_resolved("h", &[public, private])
                .is_ok()
        );
    }

    #[tokio::test]
    async fn resolver_refuses_localhost_under_strict_policy() {
        let resolver = EgressResolver::new(EgressPolicy::strict());
        let name: Name = "localhost".parse().unwrap();
        let err = match resolver.resolve(name).await {
            Ok(_) => panic!("localhost resolved under strict policy"),
            Err(e) => e,
        };
        let refused = find_refusal(&*err).expect("an egress refusal");
        assert!(refused.0.contains("loopback"), "{refused}");

        let permissive = EgressResolver::new(EgressPolicy::permissive_for_tests());
        let addrs: Vec<_> = match permissive.resolve("localhost".parse().unwrap()).await {
            Ok(a) => a.collect(),
            Err(e) => panic!("permissive resolve failed: {e}"),
        };
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    }
}
