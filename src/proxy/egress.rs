//! Egress control for destinations that a client chooses (unmatched passthrough,
//! `CONNECT`): spillway must never become a way into the network it sits in.
//!
//! A host is parsed the way browsers do (WHATWG URL host parsing), so every numeric
//! spelling of an address (`127.1`, `2130706433`, `0x7f.0.0.1`, `0177.0.0.1`) becomes the
//! address it means; names are resolved once, every resolved address is checked, and the
//! connection goes to exactly those addresses, so a DNS answer that changes between the
//! check and the connect (rebinding) has nothing to slip through. A route's own
//! `upstream` never passes through here: it is used as the operator wrote it.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{DenyMode, Egress};

/// Why an address is not a destination a client may choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Loopback,
    /// Includes the cloud metadata endpoints (169.254.169.254, fd00:ec2::254 is ULA).
    LinkLocal,
    /// RFC 1918, IPv6 unique-local (fc00::/7) and site-local (fec0::/10).
    Private,
    /// RFC 6598 carrier-grade NAT, 100.64.0.0/10 (also used by some cloud metadata).
    SharedAddressSpace,
    Multicast,
    Unspecified,
    Broadcast,
    /// 0.0.0.0/8: "this network", reaches the local host on many stacks.
    ThisNetwork,
    /// Special-purpose ranges no public service lives in (class E, benchmarking,
    /// documentation, IETF protocol assignments, discard-only, deprecated v4-compatible).
    Reserved,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Loopback => "loopback",
            Class::LinkLocal => "link-local",
            Class::Private => "private",
            Class::SharedAddressSpace => "shared (CGNAT)",
            Class::Multicast => "multicast",
            Class::Unspecified => "unspecified",
            Class::Broadcast => "broadcast",
            Class::ThisNetwork => "this-network",
            Class::Reserved => "reserved",
        }
    }

    /// The classes a route's `allow_private: true` widens: where in-cluster and
    /// same-pod services live. Link-local (cloud metadata) and the rest stay denied;
    /// `egress.allow` can still name an exact range.
    fn private_like(self) -> bool {
        matches!(
            self,
            Class::Loopback | Class::Private | Class::SharedAddressSpace
        )
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn v4_in(ip: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, len: u32) -> bool {
    let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The deny class of an IPv4 address, `None` for a public one.
pub fn classify_v4(ip: Ipv4Addr) -> Option<Class> {
    const RANGES: &[([u8; 4], u32, Class)] = &[
        ([0, 0, 0, 0], 32, Class::Unspecified),
        ([255, 255, 255, 255], 32, Class::Broadcast),
        ([0, 0, 0, 0], 8, Class::ThisNetwork),
        ([10, 0, 0, 0], 8, Class::Private),
        ([100, 64, 0, 0], 10, Class::SharedAddressSpace),
        ([127, 0, 0, 0], 8, Class::Loopback),
        ([169, 254, 0, 0], 16, Class::LinkLocal),
        ([172, 16, 0, 0], 12, Class::Private),
        ([192, 0, 0, 0], 24, Class::Reserved),
        ([192, 0, 2, 0], 24, Class::Reserved),
        ([192, 88, 99, 0], 24, Class::Reserved),
        ([192, 168, 0, 0], 16, Class::Private),
        ([198, 18, 0, 0], 15, Class::Reserved),
        ([198, 51, 100, 0], 24, Class::Reserved),
        ([203, 0, 113, 0], 24, Class::Reserved),
        ([224, 0, 0, 0], 4, Class::Multicast),
        ([240, 0, 0, 0], 4, Class::Reserved),
    ];
    RANGES
        .iter()
        .find(|(net, len, _)| v4_in(ip, *net, *len))
        .map(|(_, _, c)| *c)
}

/// The IPv4 address an IPv6 address stands for, where the network would deliver it to
/// that IPv4 host: v4-mapped, v4-translated, NAT64 (well-known prefix), 6to4 and
/// Teredo (the client address, stored inverted).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    let mapped: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0);
    let translated: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0xffff, 0, 0, 0);
    let nat64: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);
    if v6_in(ip, mapped, 96) || v6_in(ip, translated, 96) || v6_in(ip, nat64, 96) {
        return Some(low32);
    }
    if v6_in(ip, Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16) {
        return Some(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32));
    }
    if v6_in(ip, Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32) {
        return Some(Ipv4Addr::from(!((bits & 0xffff_ffff) as u32)));
    }
    None
}

/// The deny class of an IPv6 address, `None` for a public one.
pub fn classify_v6(ip: Ipv6Addr) -> Option<Class> {
    if ip.is_unspecified() {
        return Some(Class::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Class::Loopback);
    }
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    // v4-compatible (deprecated): ::a.b.c.d reaches a.b.c.d on some stacks; nothing
    // public is addressed this way, so a public embedded address is still reserved.
    if v6_in(ip, Ipv6Addr::UNSPECIFIED, 96) {
        let v4 = Ipv4Addr::from((u128::from(ip) & 0xffff_ffff) as u32);
        return Some(classify_v4(v4).unwrap_or(Class::Reserved));
    }
    let seg = |s: [u16; 8]| Ipv6Addr::from(s);
    let ranges: [(Ipv6Addr, u32, Class); 8] = [
        (seg([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]), 48, Class::Private),
        (seg([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, Class::Reserved),
        (seg([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]), 32, Class::Reserved),
        (seg([0x3fff, 0, 0, 0, 0, 0, 0, 0]), 20, Class::Reserved),
        (seg([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, Class::Private),
        (seg([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, Class::LinkLocal),
        (seg([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, Class::Private),
        (seg([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, Class::Multicast),
    ];
    ranges
        .iter()
        .find(|(net, len, _)| v6_in(ip, *net, *len))
        .map(|(_, _, c)| *c)
}

pub fn classify(ip: IpAddr) -> Option<Class> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// A host as a client wrote it, read the way a WHATWG URL parser reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedHost {
    Ip(IpAddr),
    /// Lowercase, IDNA-normalised name, to be resolved.
    Name(String),
}

/// Parses `host` (brackets optional around IPv6). Numeric IPv4 spellings in any base
/// and with fewer than four parts become the address they mean.
pub fn parse_host(host: &str) -> Result<ParsedHost, EgressError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(v6) = bare.parse::<Ipv6Addr>() {
        return Ok(ParsedHost::Ip(IpAddr::V6(v6)));
    }
    match url::Host::parse(bare) {
        Ok(url::Host::Ipv4(v4)) => Ok(ParsedHost::Ip(IpAddr::V4(v4))),
        Ok(url::Host::Ipv6(v6)) => Ok(ParsedHost::Ip(IpAddr::V6(v6))),
        Ok(url::Host::Domain(d)) => Ok(ParsedHost::Name(d)),
        Err(_) => Err(EgressError::BadHost(host.to_owned())),
    }
}

/// A destination that the egress policy refuses.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{host} is {ip}, a {class} address, which a client-chosen destination may not reach")]
pub struct Denied {
    pub host: String,
    pub ip: IpAddr,
    pub class: Class,
}

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error("{0:?} is not a valid host")]
    BadHost(String),
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    NoAddress(String),
}

/// The egress policy for one kind of client-chosen destination.
#[derive(Debug, Clone)]
pub struct Guard {
    egress: Arc<Egress>,
    /// The route's `allow_private: true`.
    allow_private: bool,
}

impl Guard {
    pub fn new(egress: Arc<Egress>, allow_private: bool) -> Self {
        Guard {
            egress,
            allow_private,
        }
    }

    /// `Ok` when `ip` may be reached. In report mode a denial is logged and let through.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), Denied> {
        // A v4-mapped address is the IPv4 host for every purpose, the allow list included.
        let ip = ip.to_canonical();
        let Some(class) = classify(ip) else {
            return Ok(());
        };
        if self.allow_private && class.private_like() {
            return Ok(());
        }
        if self.egress.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        let denied = Denied {
            host: host.to_owned(),
            ip,
            class,
        };
        match self.egress.deny_private {
            DenyMode::Enforce => {
                tracing::warn!(target: "spillway::egress", %host, %ip, class = %class, "destination denied");
                Err(denied)
            }
            DenyMode::Report => {
                tracing::warn!(
                    target: "spillway::egress",
                    %host, %ip, class = %class,
                    "destination would be denied; let through (egress.deny_private: report)"
                );
                Ok(())
            }
        }
    }

    /// Resolves `host` and checks every address: one denied address refuses the whole
    /// name, so an answer that mixes public and private addresses cannot be used to
    /// reach the private one. The caller connects to exactly what this returns.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, EgressError> {
        let addrs: Vec<SocketAddr> = match parse_host(host)? {
            ParsedHost::Ip(ip) => vec![SocketAddr::new(ip, port)],
            ParsedHost::Name(name) => tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|source| EgressError::Lookup {
                    host: host.to_owned(),
                    source,
                })?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(EgressError::NoAddress(host.to_owned()));
        }
        for a in &addrs {
            self.check(host, a.ip())?;
        }
        Ok(addrs)
    }
}

/// The resolver of the guarded client's `HttpConnector`: names go through
/// [`Guard::resolve`], so the pool connects only to checked addresses.
#[derive(Clone, Debug)]
pub struct GuardedResolver(pub Guard);

type BoxFut<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = EgressError;
    type Future = BoxFut<Self::Response, EgressError>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), EgressError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.0.clone();
        // The connector sets the port on what we return.
        Box::pin(async move { Ok(guard.resolve(name.as_str(), 0).await?.into_iter()) })
    }
}

/// `HttpConnector` skips its resolver for IP literals; this checks those first.
#[derive(Clone)]
pub struct GuardedConnector {
    inner: HttpConnector<GuardedResolver>,
    guard: Guard,
}

impl GuardedConnector {
    pub fn new(inner: HttpConnector<GuardedResolver>, guard: Guard) -> Self {
        GuardedConnector { inner, guard }
    }
}

impl tower::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = tower::BoxError;
    type Future = BoxFut<Self::Response, tower::BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let host = dst.host().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        // The same test the connector uses to skip resolution.
        if let Ok(ip) = bare.parse::<IpAddr>() {
            if let Err(denied) = self.guard.check(host, ip) {
                return Box::pin(async move { Err(denied.into()) });
            }
        }
        let fut = self.inner.call(dst);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// The `Denied` somewhere in an error's source chain, if any.
pub fn find_denied<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Denied> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(d) = err.downcast_ref::<Denied>() {
            return Some(d);
        }
        if let Some(EgressError::Denied(d)) = err.downcast_ref::<EgressError>() {
            return Some(d);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_of(host: &str) -> Option<Class> {
        match parse_host(host).unwrap() {
            ParsedHost::Ip(ip) => classify(ip),
            ParsedHost::Name(n) => panic!("{host} parsed as a name: {n}"),
        }
    }

    #[test]
    fn every_spelling_of_loopback_is_loopback() {
        for h in [
            "127.0.0.1",
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f000001",
            "0x7f.0.0.1",
            "0x7F.1",
            "0177.0.0.1",
            "0177.1",
            "017700000001",
            "127.0.0.1.",
            "127.255.255.254",
            "::1",
            "[::1]",
            "0:0:0:0:0:0:0:1",
            "::ffff:127.0.0.1",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "::ffff:0:127.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            assert_eq!(class_of(h), Some(Class::Loopback), "{h}");
        }
    }

    #[test]
    fn metadata_and_link_local_are_denied() {
        for h in [
            "169.254.169.254",
            "0xa9fea9fe",
            "2852039166",
            "0251.0376.0251.0376",
            "169.254.43518",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "fe80::1",
            "[fe80::abcd]",
        ] {
            assert_eq!(class_of(h), Some(Class::LinkLocal), "{h}");
        }
        // AWS's IPv6 metadata endpoint is unique-local.
        assert_eq!(class_of("fd00:ec2::254"), Some(Class::Private));
        assert_eq!(class_of("[fd00:ec2::254]"), Some(Class::Private));
        // Alibaba's metadata sits in the CGNAT range.
        assert_eq!(class_of("100.100.100.200"), Some(Class::SharedAddressSpace));
    }

    #[test]
    fn private_cgnat_and_special_ranges() {
        let cases = [
            ("10.0.0.1", Class::Private),
            ("10.255.255.255", Class::Private),
            ("012.1", Class::Private),
            ("167772161", Class::Private),
            ("172.16.0.1", Class::Private),
            ("172.31.255.255", Class::Private),
            ("192.168.1.1", Class::Private),
            ("0xc0.0xa8.1.1", Class::Private),
            ("::ffff:10.0.0.1", Class::Private),
            ("::ffff:192.168.0.1", Class::Private),
            ("fc00::1", Class::Private),
            ("fdff::1", Class::Private),
            ("fec0::1", Class::Private),
            ("64:ff9b:1::1", Class::Private),
            ("100.64.0.1", Class::SharedAddressSpace),
            ("100.127.255.255", Class::SharedAddressSpace),
            ("224.0.0.1", Class::Multicast),
            ("239.255.255.250", Class::Multicast),
            ("ff02::1", Class::Multicast),
            ("::ffff:224.0.0.1", Class::Multicast),
            ("0.0.0.0", Class::Unspecified),
            ("0", Class::Unspecified),
            ("::", Class::Unspecified),
            ("[::]", Class::Unspecified),
            ("::ffff:0.0.0.0", Class::Unspecified),
            ("255.255.255.255", Class::Broadcast),
            ("4294967295", Class::Broadcast),
            ("0.1.2.3", Class::ThisNetwork),
            ("240.0.0.1", Class::Reserved),
            ("198.18.0.1", Class::Reserved),
            ("192.0.0.170", Class::Reserved),
            ("::10.0.0.1", Class::Private),
            ("::8.8.8.8", Class::Reserved),
            ("2001:db8::1", Class::Reserved),
            ("100::1", Class::Reserved),
        ];
        for (h, c) in cases {
            assert_eq!(class_of(h), Some(c), "{h}");
        }
    }

    #[test]
    fn v4_compatible_forms_follow_the_embedded_address() {
        // ::127.0.0.1 is the deprecated v4-compatible form.
        assert_eq!(class_of("::127.0.0.1"), Some(Class::Loopback));
        assert_eq!(class_of("::169.254.169.254"), Some(Class::LinkLocal));
    }

    #[test]
    fn public_addresses_pass() {
        for h in [
            "8.8.8.8",
            "1.1.1.1",
            "134744072",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.1.1",
            "169.253.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            assert_eq!(class_of(h), None, "{h}");
        }
    }

    #[test]
    fn teredo_client_address_is_checked() {
        // Teredo stores the client's IPv4 inverted in the last 32 bits: !127.0.0.1.
        assert_eq!(
            class_of("2001:0:4136:e378:8000:63bf:80ff:fffe"),
            Some(Class::Loopback)
        );
    }

    #[test]
    fn names_stay_names() {
        assert_eq!(
            parse_host("Hooks.Example").unwrap(),
            ParsedHost::Name("hooks.example".into())
        );
        assert_eq!(
            parse_host("localhost").unwrap(),
            ParsedHost::Name("localhost".into())
        );
        // A name whose last label is numeric is read as IPv4 and fails: not a name.
        assert!(parse_host("foo.0x7f").is_err());
        assert!(parse_host("256.256.256.256").is_err());
    }

    fn egress(mode: DenyMode, allow: &[&str]) -> Arc<Egress> {
        Arc::new(Egress {
            deny_private: mode,
            allow: allow.iter().map(|a| a.parse().unwrap()).collect(),
        })
    }

    #[test]
    fn guard_enforces_reports_and_widens() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let meta: IpAddr = "169.254.169.254".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let public: IpAddr = "93.184.216.34".parse().unwrap();

        let strict = Guard::new(egress(DenyMode::Enforce, &[]), false);
        assert_eq!(strict.check("h", lo).unwrap_err().class, Class::Loopback);
        assert!(strict.check("h", meta).is_err());
        assert!(strict.check("h", mapped).is_err());
        assert!(strict.check("h", public).is_ok());

        let report = Guard::new(egress(DenyMode::Report, &[]), false);
        assert!(report.check("h", lo).is_ok());
        assert!(report.check("h", meta).is_ok());

        // allow_private widens in-cluster ranges, never the metadata endpoint.
        let wide = Guard::new(egress(DenyMode::Enforce, &[]), true);
        assert!(wide.check("h", lo).is_ok());
        assert!(wide.check("h", mapped).is_ok());
        assert!(wide.check("h", meta).is_err());
        assert!(wide.check("h", "224.0.0.1".parse().unwrap()).is_err());

        // The allow list matches v4-mapped addresses as their IPv4 host.
        let listed = Guard::new(egress(DenyMode::Enforce, &["10.0.0.0/8"]), false);
        assert!(listed.check("h", mapped).is_ok());
        assert!(listed.check("h", lo).is_err());
    }

    #[tokio::test]
    async fn resolve_checks_numeric_spellings_without_dns() {
        let strict = Guard::new(egress(DenyMode::Enforce, &[]), false);
        for h in [
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "[::ffff:127.0.0.1]",
        ] {
            match strict.resolve(h, 80).await {
                Err(EgressError::Denied(d)) => assert_eq!(d.class, Class::Loopback, "{h}"),
                other => panic!("{h}: {other:?}"),
            }
        }
        let open = Guard::new(egress(DenyMode::Enforce, &["127.0.0.0/8"]), false);
        let addrs = open.resolve("127.1", 8080).await.unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:8080".parse().unwrap()]);
    }

    #[tokio::test]
    async fn localhost_resolves_and_is_denied() {
        let strict = Guard::new(egress(DenyMode::Enforce, &[]), false);
        match strict.resolve("localhost", 80).await {
            Err(EgressError::Denied(d)) => assert_eq!(d.class, Class::Loopback),
            // A machine without a resolver entry for localhost cannot reach it either.
            Err(EgressError::Lookup { .. }) | Err(EgressError::NoAddress(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn denied_is_found_through_a_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] Box<dyn std::error::Error + Send + Sync>);
        let d = Denied {
            host: "x".into(),
            ip: "127.0.0.1".parse().unwrap(),
            class: Class::Loopback,
        };
        let e = Outer(Box::new(EgressError::Denied(d)));
        assert_eq!(find_denied(&e).unwrap().class, Class::Loopback);
    }
}
