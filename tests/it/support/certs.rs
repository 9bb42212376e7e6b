//! A throwaway certificate authority: a CA, server certificates with the
//! subject alternative names a test asks for, and client certificates, as
//! PEM files in a temp dir readable by the `postgres` user.

use std::path::PathBuf;
use std::process::Command;

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Name, X509};

use super::{temp_dir, TempDir};

pub struct Ca {
    pub dir: TempDir,
    /// The CA certificate (PEM).
    pub cert: PathBuf,
    ca_cert: X509,
    ca_key: PKey<Private>,
}

/// A certificate and its key, as files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn name(cn: &str) -> X509Name {
    let mut n = X509Name::builder().unwrap();
    n.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    n.build()
}

fn serial() -> openssl::asn1::Asn1Integer {
    let mut bn = BigNum::new().unwrap();
    bn.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    bn.to_asn1_integer().unwrap()
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let dir = temp_dir("pgrelay-certs");
        let ca_key = key();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        b.set_issuer_name(&name(cn)).unwrap();
        b.set_pubkey(&ca_key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&ca_key, MessageDigest::sha256()).unwrap();
        let ca_cert = b.build();
        let cert = dir.path().join("ca.crt");
        std::fs::write(&cert, ca_cert.to_pem().unwrap()).unwrap();
        let ca = Ca {
            dir,
            cert,
            ca_cert,
            ca_key,
        };
        ca.give_to_postgres();
        ca
    }

    /// A server certificate for these DNS names and IP addresses.
    pub fn server(&self, file: &str, dns: &[&str], ips: &[&str]) -> Issued {
        self.issue(file, dns.first().or(ips.first()).unwrap(), dns, ips, true)
    }

    /// A client certificate whose common name is `user`.
    pub fn client(&self, file: &str, user: &str) -> Issued {
        self.issue(file, user, &[], &[], false)
    }

    fn issue(&self, file: &str, cn: &str, dns: &[&str], ips: &[&str], server: bool) -> Issued {
        let key = key();
        let mut b = X509::builder().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&name(cn)).unwrap();
        b.set_issuer_name(self.ca_cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        if !dns.is_empty() || !ips.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for d in dns {
                san.dns(d);
            }
            for ip in ips {
                san.ip(ip);
            }
            let ext = san
                .build(&b.x509v3_context(Some(&self.ca_cert), None))
                .unwrap();
            b.append_extension(ext).unwrap();
        }
        let mut usage = ExtendedKeyUsage::new();
        if server {
            usage.server_auth();
        } else {
            usage.client_auth();
        }
        b.append_extension(usage.build().unwrap()).unwrap();
        b.sign(&self.ca_key, MessageDigest::sha256()).unwrap();
        let cert = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert, b.build().to_pem().unwrap()).unwrap();
        std::fs::write(&key_path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        self.give_to_postgres();
        Issued {
            cert,
            key: key_path,
        }
    }

    /// PostgreSQL reads its key as the `postgres` user and refuses a key
    /// others can read.
    fn give_to_postgres(&self) {
        let _ = Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(self.dir.path())
            .status();
        let _ = Command::new("chmod")
            .arg("755")
            .arg(self.dir.path())
            .status();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let p = entry.path();
            let mode = if p.extension().is_some_and(|e| e == "key") {
                "600"
            } else {
                "644"
            };
            let _ = Command::new("chmod").arg(mode).arg(&p).status();
        }
    }
}
