//! Guest MAC addresses: `52:54:00:xx:xx:xx` (the QEMU OUI, locally used), the last three bytes
//! derived from the VM id.

use std::fmt;

use sha2::{Digest, Sha256};

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The MAC of `vm_id`: `52:54:00` + the first three bytes of sha256(`vm_id`), or of
    /// sha256(`vm_id` + `"#" + attempt`) for `attempt > 0` (used when the first candidate is
    /// already taken by another VM on this host).
    pub fn for_vm(vm_id: &str, attempt: u32) -> Self {
        let digest = if attempt == 0 {
            Sha256::digest(vm_id.as_bytes())
        } else {
            Sha256::digest(format!("{vm_id}#{attempt}").as_bytes())
        };
        Self([0x52, 0x54, 0x00, digest[0], digest[1], digest[2]])
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("invalid MAC {s:?}"));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("invalid MAC {s:?}"));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| format!("invalid MAC {s:?}"))?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_and_round_trips() {
        let a = Mac::for_vm("vm-0123456789ab", 0);
        assert_eq!(a, Mac::for_vm("vm-0123456789ab", 0));
        assert_ne!(a, Mac::for_vm("vm-0123456789ab", 1));
        let s = a.to_string();
        assert!(s.starts_with("52:54:00:"));
        assert_eq!(s.parse::<Mac>().unwrap(), a);
        assert!("52:54:00:zz:00:00".parse::<Mac>().is_err());
    }
}
