"""Make `data/movies.csv`: fictional movies in the shape of the IMDB top-1000 table.

The titles, people and overviews are invented by this script (nothing is copied), and
the output is the same on every run, so the file in the repository can be remade, and
any number of rows can be made for benchmarks:

    python data/make_movies.py                      # data/movies.csv, 240 rows
    python data/make_movies.py 1000000 /tmp/movies-1m.csv
"""

from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

ROWS = 240
ADJECTIVES = ["Silent", "Crimson", "Last", "Hollow", "Golden", "Broken", "Distant", "Paper",
              "Iron", "Quiet", "Burning", "Northern", "Lost", "Glass", "Midnight", "Wild"]
NOUNS = ["Harbor", "Orchard", "Signal", "Frontier", "Lantern", "Garden", "Engine", "Tide",
         "Summit", "Letter", "Kingdom", "Bridge", "Archive", "Circus", "Meridian", "Valley"]
HEROES = ["a retired detective", "a young cartographer", "an exiled chef",
          "a stubborn lighthouse keeper", "a grieving violinist", "two estranged brothers",
          "a rookie astronaut", "a small-town teacher", "a disgraced surgeon",
          "an orphaned street magician", "a reluctant heir", "a marine biologist",
          "a jazz pianist", "a union organiser", "a teenage hacker", "an aging boxer"]
PLACES = ["a fog-bound fishing village", "post-war Vienna", "a colony ship between stars",
          "the Mongolian steppe", "a crumbling Parisian hotel", "1970s Lagos",
          "a flooded future Venice", "a remote Antarctic station", "the Mississippi delta",
          "a Tokyo night market", "a border town in the Sonoran desert", "medieval Kyoto",
          "a Scottish island", "Buenos Aires during a blackout"]
EVENTS = ["uncovers a ledger that links the town's founders to a buried crime",
          "is hired to find a painting that may never have existed",
          "receives letters from someone who died ten years ago",
          "wakes to find that every clock has stopped at the same minute",
          "must hide a wounded stranger from the men hunting him",
          "inherits a failing restaurant and a debt to the wrong people",
          "discovers a signal repeating beneath the ice",
          "agrees to one final job that goes wrong within the hour",
          "falls for the rival they were sent to ruin",
          "trains an unlikely team for a championship nobody expects them to reach"]
STAKES = ["before the storm cuts them off for the winter",
          "while an old friendship slowly turns into a betrayal",
          "and learns what the family has kept secret for decades",
          "as the city around them tears itself apart",
          "with nothing but a borrowed camera and a week of courage",
          "and has to choose between the truth and the people they love",
          "before the last ferry leaves",
          "while a journalist closes in on the same story"]
GENRES = ["Drama", "Crime, Drama", "Mystery, Thriller", "Sci-Fi, Drama", "Comedy, Drama",
          "Adventure, Drama", "Romance, Drama", "Action, Thriller", "Animation, Adventure",
          "Biography, Drama", "Horror, Mystery", "Drama, Sport", "Drama, Music",
          "Comedy, Romance", "Drama, War", "Fantasy, Adventure"]
CERTIFICATES = ["U", "UA", "A", "PG-13", "R", "G"]
FIRST = ["Ana", "Tomás", "Mei", "Oluwaseun", "Ingrid", "Rahul", "Chloé", "Kenji", "Amara",
         "Lukas", "Sofía", "Dmitri", "Nadia", "Hugo", "Priya", "Jonah", "Zainab", "Mateo"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Ibarra", "Novak", "Haddad", "Brennan",
        "Castell", "Achterberg", "Salgado", "Kowalczyk", "Mensah", "Varga", "Iyer", "Duval"]


PEOPLE = [f"{f} {la}" for f in FIRST for la in LAST]
MISSES_BEFORE_NUMBERING = 100  # titles alone run out after about 5,000 movies


def movies(count: int, seed: int = 7) -> list[dict[str, object]]:
    """`count` movies with unique titles: drawn from the word lists while they last, then
    numbered (the first thousands are the same whatever the count)."""
    rng = random.Random(seed)
    rows, titles, misses = [], set(), 0
    while len(rows) < count:
        title = f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        if misses >= MISSES_BEFORE_NUMBERING:
            title = f"{title} {len(rows) + 1}"
        elif title in titles:
            title = f"{title} {rng.choice(['II', 'Returns', 'Rising', 'of ' + rng.choice(LAST)])}"
        if title in titles:
            misses += 1
            continue
        titles.add(title)
        hero, place = rng.choice(HEROES), rng.choice(PLACES)
        overview = (f"In {place}, {hero} {rng.choice(EVENTS)}, {rng.choice(STAKES)}.")
        people = rng.sample(PEOPLE, 5)
        rows.append({
            "Series_Title": title,
            "Released_Year": rng.randint(1950, 2024),
            "Certificate": rng.choice(CERTIFICATES),
            "Runtime": f"{rng.randint(82, 178)} min",
            "Genre": rng.choice(GENRES),
            "IMDB_Rating": round(rng.uniform(7.6, 9.3), 1),
            "Overview": overview[0].upper() + overview[1:],
            "Meta_score": rng.choice([None, *range(55, 100)]),
            "Director": people[0],
            "Star1": people[1],
            "Star2": people[2],
            "Star3": people[3],
            "Star4": people[4],
            "No_of_Votes": rng.randint(25_000, 2_400_000),
            "Gross": f"{rng.randint(1, 900_000_000):,}" if rng.random() < 0.8 else None,
        })
    return rows


def main(argv: list[str]) -> None:
    rows = movies(int(argv[0]) if argv else ROWS)
    target = Path(argv[1]) if len(argv) > 1 else Path(__file__).with_name("movies.csv")
    with target.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} movies to {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
