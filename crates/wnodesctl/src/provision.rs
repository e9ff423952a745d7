//! `wnodesctl provision`: the site's identities, authorization file, streams and durables.

use wnodes_bus::ErrorChain;
use wnodes_site::{Action, AuthDir, Mode, Report, SiteDescription, SiteError, streams};

use crate::{DATAERR, ProvisionArgs, SOFTWARE, UNAVAILABLE};

fn print(title: &str, report: &Report) {
    for change in report.notable() {
        println!("{change}");
    }
    println!("{title}: {}", report.summary());
}

pub(crate) async fn provision(args: ProvisionArgs) -> u8 {
    wnodes_bus::connect::install_crypto_provider();
    let mode = if args.dry_run || args.check {
        Mode::DryRun
    } else {
        Mode::Apply
    };
    let site = match SiteDescription::load(&args.site) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return DATAERR;
        }
    };
    let auth = AuthDir::new(&args.out);
    let mut changed = false;
    match auth.provision(&site, mode) {
        Ok(report) => {
            print("identities", &report);
            changed |= !report.is_noop();
        }
        Err(e) => {
            eprintln!("wnodesctl: {}", ErrorChain(&e));
            return SOFTWARE;
        }
    }
    if let Some(url) = &args.nats {
        let creds = args.creds.clone().unwrap_or_else(|| auth.admin_creds());
        let cfg = wnodes_bus::NatsConfig {
            url: url.clone(),
            creds_file: Some(creds),
            tls: crate::tls_of(args.tls_ca.as_ref()),
            ..Default::default()
        };
        let client = match wnodes_bus::connect::connect(&cfg, "wnodesctl", None, None).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return UNAVAILABLE;
            }
        };
        let js = async_nats::jetstream::new(client);
        match streams::provision(&js, &site, mode).await {
            Ok(report) => {
                print("streams and consumers", &report);
                changed |= !report.is_noop();
                if report.count(&Action::CannotChange) > 0 {
                    eprintln!(
                        "wnodesctl: some settings cannot be changed in place (see `cannot change` above)"
                    );
                    return SOFTWARE;
                }
            }
            Err(e @ SiteError::JetStream { .. }) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return UNAVAILABLE;
            }
            Err(e) => {
                eprintln!("wnodesctl: {}", ErrorChain(&e));
                return SOFTWARE;
            }
        }
    }
    if mode == Mode::DryRun {
        println!("(dry run: nothing was changed)");
    }
    if args.check && changed { 1 } else { 0 }
}
